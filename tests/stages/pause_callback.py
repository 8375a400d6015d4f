"""A Lightning callback that makes stop-signal tests deterministic (given to a CLI subprocess with
``+callbacks.pause=...``, :func:`cli_runner.paused`): once the stage's first complete checkpoint exists it
writes ``ready`` and holds training at that step until the process receives a stop signal (or ``go``
appears), so a signal or a kill always lands mid-stage, at a known step, however fast or loaded the machine;
or sends the signal itself (``send``), for a stage stopped inside the test's process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from bam_pipeline.training import preemption
from bam_pipeline.training.job import CKPT_DIR, complete_checkpoint


class PauseAfterCheckpoint(Callback):
    """``send``: a signal's name (SIGTERM) the process sends itself once paused, for a stage stopped in the
    test's own process; ``only``: pause only the stage whose working directory's path holds it (``branch/math``:
    one job of a sweep)."""

    def __init__(self, ready: str, go: str | None = None, send: str | None = None, timeout_s: float = 300.0,
                 only: str | None = None) -> None:
        self.ready, self.go, self.timeout_s, self.only = Path(ready), None if go is None else Path(go), timeout_s, only
        self.send = None if send is None else signal.Signals[send]
        self.paused = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.paused or not trainer.is_global_zero or (self.only and self.only not in str(trainer.default_root_dir)):
            return
        if not any(complete_checkpoint(p) for p in (Path(trainer.default_root_dir) / CKPT_DIR).glob("*.ckpt")):
            return
        self.paused = True
        self.ready.write_text(str(trainer.global_step))
        if self.send is not None:
            os.kill(os.getpid(), self.send)
        deadline = time.monotonic() + self.timeout_s
        while preemption._state["received"] is None and not (self.go is not None and self.go.exists()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"paused at step {trainer.global_step} for {self.timeout_s} s: no signal came")
            time.sleep(0.01)
