"""bam-pipeline: Branch-Attend-Mix upcycling of a dense transformer into a Mixture of Experts.

``bam_pipeline.load(artifact_dir)`` returns any stage artifact's model (seed, branch, mix, moe) in eval
mode, ``model(input_ids) -> logits``, with its tokenizer at ``model.tokenizer``.
"""

__version__ = "0.1.0"


def load(artifact_dir, **kwargs):
    """The model of a stage artifact: see :func:`bam_pipeline.loading.load`."""
    from bam_pipeline.loading import load as _load

    return _load(artifact_dir, **kwargs)
