"""Numerical failure end to end: weights that turn NaN mid-training or at the last step are never
checkpointed or published, the last good checkpoint stays, and the rerun resumes from it to the weights an
uninterrupted run trains (the one-line refusals themselves: the catalogue's numerical failure cases)."""

from __future__ import annotations

import shutil

import pytest
import torch
from cli_runner import SEED_ARGS, cli_here
from safetensors.torch import load_file


def _one_error_line(out: str) -> str:
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    return errors[0]


@pytest.mark.parametrize("step, says, kept, rerun", [
    (8, "training loss became nan at step 8", "step=4.ckpt", False),  # the next step's loss check stops it
    (32, "seed: not published: after 32 steps its weights hold 1 non-finite values", "step=28.ckpt", True),
])
def test_weights_that_turn_nan_keep_the_last_good_checkpoint_and_the_rerun_resumes_from_it(
        smoke_run, reference_seed, tmp_path, step, says, kept, rerun):
    root = tmp_path / "stages"
    shutil.copytree(smoke_run[0] / "smoke" / "data", root / "smoke" / "data")
    poison = f"+callbacks.poison={{_target_:poison_callback.PoisonAfter,step:{step}}}"
    r = cli_here(root, *SEED_ARGS, poison)  # SEED_ARGS: 32 steps, a checkpoint every 4
    assert r.returncode == 2, r.out[-3000:]
    assert says in _one_error_line(r.out)
    work = root / "smoke" / ".work" / "seed" / "main"
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == [kept]  # not the poisoned step's
    assert not (root / "smoke" / "seed" / "main").exists()
    if not rerun:  # one resume is enough: from the last step's refusal, 4 steps to train again
        return
    resumed = cli_here(root, *SEED_ARGS, check=True)
    assert f"resuming from {work / 'checkpoints' / kept}" in resumed.out
    want = load_file(str(reference_seed))
    got = load_file(str(root / "smoke" / "seed" / "main" / "model.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)  # finite, as trained without a fault
