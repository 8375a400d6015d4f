"""The transformers adapter of a custom-format export, copied into the directory beside the model's own
code (:func:`bam_pipeline.interop.hf_export.forward_pass_files`); bam_pipeline never imports it."""
