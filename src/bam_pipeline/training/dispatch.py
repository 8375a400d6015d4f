"""How a training stage runs its MoE experts: ``grouped_mm`` or the per-expert loop (model/moe.py), chosen once.

``train.moe_dispatch``:

- ``loop`` or ``grouped`` forces that path (grouped where ``grouped_mm`` cannot run the tensors is one error
  line at the first step, model/moe.py);
- ``auto`` (the default) measures. On a CUDA device, where this torch implements ``grouped_mm`` for the
  compute dtype (:func:`~bam_pipeline.model.moe.grouped_mm_supported`), a one-time probe runs both paths at
  the layer's real shape (the micro-batch's token assignments, d_model, d_ff, experts) in the compute dtype,
  forward and backward, checks that they agree and times them (:func:`probe`). Grouped is used only when it
  ran, agreed and was faster, on every rank; otherwise the loop, with one line saying why. On a CPU the loop,
  without a probe (there grouped_mm measured slower: docs/measurements.md).

The choice (:class:`Dispatch`) is written to the stage's work directory before the first step, so a resumed
stage keeps it without probing again, and goes into the artifact's manifest (``moe_dispatch``). It is not part
of the stage's identity: both paths compute the same function. An exported or loaded model never probes: its
layers run the loop unless told otherwise.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.callbacks import Callback

from bam_pipeline.model.moe import MoEFeedForward, grouped_mm_supported
from bam_pipeline.store.files import write_json

SETTINGS = ("auto", "grouped", "loop")
RECORD = "moe_dispatch.json"  # in the stage's work directory


@dataclass(frozen=True)
class ProbeResult:
    """Both paths run once at the layer's shape: what grouped_mm raised (None: it ran), the largest difference
    of its output from the loop's and the tolerance for it, and the median seconds of a forward and backward."""

    error: Optional[str] = None
    max_diff: float = 0.0
    tolerance: float = 0.0
    grouped_s: float = 0.0
    loop_s: float = 0.0


@dataclass(frozen=True)
class Dispatch:
    """The path a stage's MoE layers run, and why."""

    setting: str  # train.moe_dispatch
    used: str  # "grouped" | "loop"
    why: str
    probe: Optional[ProbeResult] = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.probe is None:
            out.pop("probe")
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Dispatch":
        probe = d.get("probe")
        return cls(d["setting"], d["used"], d["why"], ProbeResult(**probe) if probe else None)


def decide(setting: str, *, on_cuda: bool, supported: bool, probe: Callable[[], ProbeResult],
           reason_unsupported: str = "") -> Dispatch:
    """The path for ``setting`` (``train.moe_dispatch``), probing only where ``auto`` needs to (pure but for
    ``probe``, which is called at most once)."""
    if setting in ("loop", "grouped"):
        return Dispatch(setting, setting, f"train.moe_dispatch={setting}")
    if not on_cuda:
        return Dispatch(setting, "loop", "on the CPU the loop (grouped_mm measured slower there)")
    if not supported:
        return Dispatch(setting, "loop", f"grouped_mm cannot run here ({reason_unsupported})")
    result = probe()
    if result.error is not None:
        return Dispatch(setting, "loop", f"grouped_mm failed at this layer's shape: {result.error}", result)
    if not result.max_diff <= result.tolerance:
        return Dispatch(setting, "loop", f"grouped_mm differs from the loop by {result.max_diff:.3g} (more than "
                                         f"{result.tolerance:.3g})", result)
    if not result.grouped_s < result.loop_s:
        return Dispatch(setting, "loop", f"grouped_mm was not faster ({result.grouped_s * 1e3:.2f} ms against the "
                                         f"loop's {result.loop_s * 1e3:.2f} ms a step of this layer)", result)
    return Dispatch(setting, "grouped", f"grouped_mm {result.grouped_s * 1e3:.2f} ms against the loop's "
                                        f"{result.loop_s * 1e3:.2f} ms a step of this layer, equal within "
                                        f"{result.tolerance:.3g}", result)


def probe(layer: MoEFeedForward, assignments: int, dtype: torch.dtype, repeats: int = 5) -> ProbeResult:
    """Run ``layer``'s experts both ways on ``assignments`` random rows (the micro-batch's tokens times the
    experts each gets) in ``dtype``, spread over the experts at random, forward and backward; compare the outputs
    and time each (median of ``repeats`` after a warm-up, interleaved). Nothing is accumulated into the layer's
    gradients."""
    device = layer.w1.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    E, D = layer.w1.shape[0], layer.w1.shape[1]
    x = torch.randn(assignments, D, generator=gen).to(device=device, dtype=dtype)
    counts = torch.bincount(torch.randint(E, (assignments,), generator=gen), minlength=E).to(device)
    weights = [layer.w1, layer.w3, layer.w2]
    grad_out = torch.randn(assignments, D, generator=gen).to(device)

    def run(path: str) -> torch.Tensor:
        before = layer.dispatch
        layer.dispatch = path
        try:
            xs = x.detach().requires_grad_(True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = layer._experts(xs, counts)
            torch.autograd.grad(out, [xs, *weights], grad_outputs=grad_out.to(out.dtype))  # a dense gradient
            return out.detach()
        finally:
            layer.dispatch = before

    def timed(path: str) -> float:
        sync()
        t0 = time.perf_counter()
        run(path)
        sync()
        return time.perf_counter() - t0

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    loop_out = run("loop")
    try:
        grouped_out = run("grouped")
    except Exception as e:  # noqa: BLE001 - whatever grouped_mm raises here means: not on this device
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return ProbeResult(error=f"{type(e).__name__}: {first}"[:300])
    ref = loop_out.float()
    diff = (grouped_out.float() - ref).abs().max().item() if ref.numel() else 0.0
    tolerance = (2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4) * max(ref.abs().max().item(), 1e-6)
    times: dict[str, list[float]] = {"grouped": [], "loop": []}
    for _ in range(repeats):
        for path in ("grouped", "loop"):
            times[path].append(timed(path))
    return ProbeResult(None, diff, tolerance, statistics.median(times["grouped"]), statistics.median(times["loop"]))


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a trainer.precision runs the matmuls in."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


class ChooseDispatch(Callback):
    """Chooses the stage's MoE dispatch at the start of training (module docstring) and sets it on every MoE
    layer; :attr:`chosen` is what the manifest records (None: the model has no MoE FFN)."""

    def __init__(self, setting: str, work: Path, micro_batch_tokens: int, precision: str,
                 label: str = "", say: Callable[[str], None] = print) -> None:
        self.setting, self.work, self.tokens, self.precision = setting, Path(work), micro_batch_tokens, precision
        self.label, self.say = label, say
        self.chosen: Optional[Dispatch] = None

    def on_train_start(self, trainer, pl_module) -> None:
        layers = [m for m in pl_module.modules() if isinstance(m, MoEFeedForward) and m.cfg.ffn_experts > 1]
        if not layers:
            return
        path = self.work / RECORD
        recorded = _read(path)
        if recorded is not None and recorded.setting == self.setting:
            chosen = recorded  # a resumed stage keeps its path
        else:
            chosen = self._choose(trainer, layers[0])
            if trainer.is_global_zero:
                write_json(path, chosen.to_dict())
                if self.setting == "auto" and trainer.strategy.root_device.type == "cuda":  # what the probe found
                    self.say(f"{self.label}: MoE dispatch {chosen.used}: {chosen.why}")
        for layer in layers:
            layer.dispatch = chosen.used
        self.chosen = chosen

    def _choose(self, trainer, layer: MoEFeedForward) -> Dispatch:
        dtype = compute_dtype(self.precision)
        device = trainer.strategy.root_device
        on_cuda = device.type == "cuda"
        assignments = self.tokens * (layer.cfg.ffn_router.k if layer.cfg.ffn_router.kind == "topk" else 1)
        cfg = layer.cfg
        # empty tensors of the layer's widths: the support check reads shapes, the device and the dtype only
        row, w1, w2 = (torch.empty(0, cfg.d_model, device=device), torch.empty(0, cfg.d_model, cfg.d_ff),
                       torch.empty(0, cfg.d_ff, cfg.d_model))
        supported = on_cuda and grouped_mm_supported(row, w1, w2, dtype=dtype)
        why_not = (f"{dtype} on compute capability {torch.cuda.get_device_capability(device)} with torch "
                   f"{torch.__version__}" if on_cuda else "")

        def measure() -> ProbeResult:
            """On a layer of the same shape, not the stage's own (its weights may be sharded: FSDP), with the
            stage's random state left as it was."""
            with torch.random.fork_rng(devices=[device] if on_cuda else []):
                torch.manual_seed(0)
                return probe(MoEFeedForward(cfg, own_router=False).to(device), assignments, dtype)

        chosen = decide(self.setting, on_cuda=on_cuda, supported=supported, probe=measure, reason_unsupported=why_not)
        if self.setting == "auto" and trainer.world_size > 1:  # every rank runs the same path
            everyone = trainer.strategy.reduce_boolean_decision(chosen.used == "grouped", all=True)
            if chosen.used == "grouped" and not everyone:
                chosen = Dispatch(self.setting, "loop", "another rank's probe chose the loop", chosen.probe)
        return chosen


def _read(path: Path) -> Optional[Dispatch]:
    try:
        return Dispatch.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
