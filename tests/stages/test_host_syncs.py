"""No host sync per training step (issue 24, item 2): over a smoke moe stage, a spy on ``Tensor.item``,
``Tensor.__bool__`` and ``Tensor.tolist`` finds them only on the steps that log, around validations and
checkpoints, and in the loop dispatch's read of the expert counts (model/moe.py), besides host-side tensors
(the optimizer's step counters, the data pipeline's CPU batches), which are no device sync on a GPU either.
Where CUDA exists, ``torch.cuda.set_sync_debug_mode`` would say the same of the device; this machine has none."""

from __future__ import annotations

import shutil
import traceback
from collections import Counter

import torch
from cli_runner import cli_here

from bam_pipeline.training.module import LMModule

LOG_EVERY, VAL_EVERY = 4, 8
# where a read of a tensor's value is expected: (file part, function or None, whether only the direct caller counts;
# training_step itself runs inside the optimizer's closure, so the optimizer's own reads are its direct ones)
EXPECTED = {
    "the loop dispatch's count read": ("model/moe.py", "_expert_loop", True),
    "the optimizer's host-side step counters": ("torch/optim/", None, True),
    "the data pipeline's CPU batches": ("data/datamodule.py", None, True),
    "a checkpoint": ("training/job.py", "_save_topk_checkpoint", False),
    "a validation": ("lightning/pytorch/loops/evaluation_loop.py", None, False),
    "a stop or the end of training": ("training/preemption.py", "on_exception", False),
}

def test_a_training_step_waits_for_the_device_only_when_it_logs(smoke_copy, monkeypatch):
    state = {"step": 0}
    calls: list[tuple[int, str, str]] = []  # (step, what, where)
    training_step = LMModule.training_step

    def tracked_step(self, batch, batch_idx):
        state["step"] = self.global_step + 1
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(LMModule, "training_step", tracked_step)
    for name in ("item", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if state["step"]:
                stack = traceback.extract_stack()[:-1]
                why = next((label for label, (part, fn, direct) in EXPECTED.items()
                            if any(part in f.filename and (fn is None or f.name == fn)
                                   for f in (stack[-1:] if direct else stack))), None)
                ours = next((f"{f.filename.split('bam_pipeline/')[-1]}:{f.lineno} {f.name}" for f in reversed(stack)
                             if "bam_pipeline" in f.filename and "tests" not in f.filename), "?")
                inner = " < ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in stack[-4:])
                calls.append((state["step"], why or "", f"{_name} from {ours} [{inner}]"))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    shutil.rmtree(smoke_copy / "smoke" / "moe" / "bam")
    steps = 16
    cli_here(smoke_copy, "stage=moe", "mix=bam", f"budget.moe.tokens={steps * 256}", f"train.log_every={LOG_EVERY}",
             f"train.val_every={VAL_EVERY}", "train.batch_size=4", check=True)
    monkeypatch.undo()
    assert max(step for step, _, _ in calls) == steps  # the spy saw the whole stage
    unexpected = Counter((step, where) for step, why, where in calls
                         if not why and step % LOG_EVERY and step != steps)
    assert not unexpected, f"host syncs on steps that do not log: {sorted(unexpected.items())[:20]}"
    logging = {where for step, why, where in calls if not why and step % LOG_EVERY == 0}
    assert any("module.py" in w for w in logging), logging  # the logged scalars are read, on logging steps
    assert any(why == "the loop dispatch's count read" for _, why, _ in calls)
