"""The MoE dispatch of a training stage (training/dispatch.py): the decision with the probe made to fail, to
differ and to be slower; the probe itself on this machine; the version table; the choice kept on resume and
recorded in the manifest; models outside training run the loop."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from bam_pipeline.model import moe as moe_module
from bam_pipeline.model import preset
from bam_pipeline.model.moe import MoEFeedForward, cuda_grouped_mm_runs, grouped_mm_supported
from bam_pipeline.model.transformer import BAMTransformer
from bam_pipeline.training.dispatch import RECORD, ChooseDispatch, Dispatch, ProbeResult, decide, probe

CFG = preset("smoke").replace(ffn_experts=4)


def _never() -> ProbeResult:
    raise AssertionError("no probe was needed")


@pytest.mark.parametrize("result, used, says", [
    (ProbeResult(error="RuntimeError: torch._grouped_mm is only supported on CUDA devices with compute capability = 9.0"),
     "loop", "grouped_mm failed at this layer's shape: RuntimeError: torch._grouped_mm is only supported"),
    (ProbeResult(max_diff=0.5, tolerance=0.01, grouped_s=0.001, loop_s=0.002), "loop", "differs from the loop by 0.5"),
    (ProbeResult(max_diff=0.0, tolerance=0.01, grouped_s=0.003, loop_s=0.002), "loop",
     "was not faster (3.00 ms against the loop's 2.00 ms"),
    (ProbeResult(max_diff=0.001, tolerance=0.01, grouped_s=0.001, loop_s=0.002), "grouped", "grouped_mm 1.00 ms"),
])
def test_auto_on_cuda_uses_grouped_only_where_the_probe_ran_agreed_and_was_faster(result, used, says):
    calls = []
    chosen = decide("auto", on_cuda=True, supported=True, probe=lambda: calls.append(1) or result)
    assert (chosen.used, calls, chosen.probe) == (used, [1], result) and says in chosen.why, chosen.why


def test_forced_paths_and_the_cpu_need_no_probe():
    assert decide("loop", on_cuda=True, supported=True, probe=_never).used == "loop"
    assert decide("grouped", on_cuda=False, supported=False, probe=_never).used == "grouped"
    assert decide("auto", on_cuda=False, supported=True, probe=_never).used == "loop"
    unsupported = decide("auto", on_cuda=True, supported=False, probe=_never, reason_unsupported="torch.float32 ...")
    assert unsupported.used == "loop" and "cannot run here (torch.float32" in unsupported.why


@pytest.mark.parametrize("version, capability, runs", [
    ("2.7.1", (9, 0), False), ("2.8.0+cu128", (9, 0), True), ("2.8.0+cu128", (12, 0), False),
    ("2.8.0", (8, 0), False), ("2.9.1", (10, 0), True), ("2.9.1", (8, 0), False), ("2.10.0", (8, 0), True),
    ("2.13.0", (12, 0), True), ("2.13.0", (7, 5), False),
])
def test_grouped_mm_runs_on_the_devices_each_torch_implements_it_for(version, capability, runs):
    assert cuda_grouped_mm_runs(version, capability) is runs


def test_the_probe_runs_both_paths_at_the_layers_shape_here():
    layer = MoEFeedForward(CFG)
    if not grouped_mm_supported(torch.zeros(1, CFG.d_model), layer.w1, layer.w2):
        pytest.skip("grouped_mm does not run float32 on this CPU")
    result = probe(layer, 256, torch.float32, repeats=2)
    assert result.error is None and result.max_diff <= result.tolerance and result.grouped_s > 0 and result.loop_s > 0
    assert layer.dispatch == "loop" and all(p.grad is None for p in layer.parameters())  # left as it was


def test_a_probe_that_raises_is_a_result_not_an_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("torch._grouped_mm is only supported on CUDA devices with compute capability = 9.0")

    monkeypatch.setattr(moe_module, "_grouped_mm", broken)
    result = probe(MoEFeedForward(CFG), 64, torch.float32, repeats=1)
    assert result.error.startswith("RuntimeError: torch._grouped_mm is only supported")


def _fit_start(tmp_path, setting: str, said: list[str]):
    model = BAMTransformer(CFG.replace(attn_experts=1))
    chooser = ChooseDispatch(setting, tmp_path, 64, "32-true", "moe/x", say=said.append)
    trainer = SimpleNamespace(is_global_zero=True, world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    chooser.on_train_start(trainer, model)
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    return chooser, {layer.dispatch for layer in layers}


def test_the_choice_is_recorded_and_a_resumed_stage_keeps_it(tmp_path, monkeypatch):
    said: list[str] = []
    chooser, paths = _fit_start(tmp_path, "auto", said)
    assert paths == {"loop"} and chooser.chosen.used == "loop" and said == []  # the CPU: no probe, no line
    assert json.loads((tmp_path / RECORD).read_text())["used"] == "loop"
    # a stage resumed on a machine where its first run chose grouped keeps grouped, without probing again
    (tmp_path / RECORD).write_text(json.dumps(Dispatch("auto", "grouped", "probed on a GPU").to_dict()))
    monkeypatch.setattr("bam_pipeline.training.dispatch.decide", lambda *a, **k: pytest.fail("probed again"))
    chooser, paths = _fit_start(tmp_path, "auto", said)
    assert paths == {"grouped"} and chooser.chosen.why == "probed on a GPU"
    monkeypatch.undo()
    chooser, paths = _fit_start(tmp_path, "loop", said)  # another setting: decided anew
    assert paths == {"loop"} and chooser.chosen.why == "train.moe_dispatch=loop"


def test_models_outside_training_run_the_loop():
    assert {m.dispatch for m in BAMTransformer(CFG).modules() if isinstance(m, MoEFeedForward)} == {"loop"}
