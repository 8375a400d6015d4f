"""Mixture variants and upcycling: which dense models a mixture is made of (one declaration per
variant, :mod:`~bam_pipeline.mixing.variant`) and the pure functions that build its state dict
(:mod:`~bam_pipeline.mixing.upcycle`)."""
