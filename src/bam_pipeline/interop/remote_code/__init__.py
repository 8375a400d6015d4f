"""The custom code of a Hugging Face export (``configuration_bam.py``, ``modeling_bam.py``): copied
verbatim into every custom-format export directory, where ``auto_map`` points transformers at it.

Both files import torch and transformers only, never ``bam_pipeline``, so an export loads where
this package is not installed. ``bam_pipeline`` itself never imports them; the export tests load
them through transformers in a process that cannot import ``bam_pipeline``.
"""
