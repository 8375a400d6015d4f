"""The artifact store: files written atomically and checksummed (:mod:`~bam_pipeline.store.files`),
stage artifacts with their manifests and model weights (:mod:`~bam_pipeline.store.artifacts`), and
the layout of a run directory, which owns every path in it (:mod:`~bam_pipeline.store.layout`)."""
