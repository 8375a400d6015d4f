"""keep_freed_memory: after it, a freed large tensor's pages serve the next one (no page faults)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from bam_pipeline.training.host_memory import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else None

    def step():  # what a training step does: allocate, touch and free tensors above mmap's threshold
        for _ in range(3):
            torch.empty(16 * 2**20).fill_(1.0)  # 64 MB

    for _ in range(12):  # the heap grows past the aligned blocks' holes, then settles
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_serves_the_next_step_without_page_faults():
    _, default = _faults("default")
    applied, kept = _faults("keep")
    assert applied == "True"
    # by default every 64 MB block is freshly mapped: 15 x 16384 4-KiB pages here (fewer with huge pages)
    assert default >= 15
    assert kept < default // 20
