"""The transformers adapter a custom export copies beside the model's own files; bam_pipeline never imports it."""
