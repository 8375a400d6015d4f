"""``train.compile``: every transformer block run under ``torch.compile``, or the eager model with one
line saying why not.

Blocks are compiled one by one (``nn.Module.compile``: parameter names and the state dict stay as
they are), so FSDP units, activation checkpointing and the chunked loss keep working around them;
the MoE loop dispatch's host sync is a graph break, not an error.
"""

from __future__ import annotations

import torch

from bam_pipeline.model.transformer import BAMTransformer, Block


def compile_unsupported() -> str | None:
    """Why ``torch.compile`` cannot run here (its default backend needs dynamo and, on the CPU, a
    C++ compiler), or None."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if not torch.cuda.is_available():
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except (RuntimeError, OSError) as e:
            return f"no C++ compiler for torch.compile on the CPU ({str(e).splitlines()[0]})"
    return None


def compile_blocks(model: BAMTransformer) -> bool:
    """Compile each block of ``model`` in place; False (and one printed line) where it cannot."""
    why = compile_unsupported()
    if why is not None:
        print(f"train.compile=true: running eager, {why}")
        return False
    for module in model.modules():
        if isinstance(module, Block):
            module.compile()
    return True
