"""The config boundary: where the shipped Hydra configs live and how an option of a group is loaded
(:mod:`~bam_pipeline.config.files`), and the typed reader that turns a config section into a
validated spec or one error line naming the key (:mod:`~bam_pipeline.config.reading`)."""
