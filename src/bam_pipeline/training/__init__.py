"""Training internals: the typed ``train:`` settings, budgets and the learning-rate schedule, the
LightningModule, external loggers, distributed-launch ranks, and one stage's training job from
the Trainer to the published artifact (:mod:`~bam_pipeline.training.job`)."""
