"""bf16-mixed through the real training loop (issue 24, item 4), on the CPU, which Lightning supports: a smoke
seed, its three branches and the BAM moe stage train in bfloat16 autocast, the loss decreases, routers and the
loss stay float32, and every artifact is published in float32 (the master weights)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_runner import cli_here

from safetensors.torch import load_file

from bam_pipeline.store.artifacts import load_model, read_artifact

BF16 = "trainer.precision=bf16-mixed"


def _losses(artifact) -> list[float]:
    rows = [json.loads(line) for line in (artifact / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_seed_branches_and_moe_train_in_bf16_mixed_and_publish_float32(smoke_run, tmp_path):
    root = tmp_path / "stages"
    shutil.copytree(smoke_run[0] / "smoke" / "data", root / "smoke" / "data")
    cli_here(root, "stage=seed", BF16, check=True)
    cli_here(root, "-m", "stage=branch", "domain=code,math,law", BF16, check=True)
    cli_here(root, "stage=mix", "mix=bam", BF16, check=True)
    cli_here(root, "stage=moe", "mix=bam", BF16, check=True)
    run = root / "smoke"
    for label in ("seed/main", "branch/code", "branch/math", "branch/law", "moe/bam"):
        manifest = json.loads((run / label / "manifest.json").read_text())
        assert manifest["config"]["precision"] == "bf16-mixed", label  # part of the stage's identity
        losses = _losses(run / label)
        assert len(losses) >= 2 and losses[-1] < losses[0], (label, losses)
        stored = load_file(str(run / label / "model.safetensors"))
        assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float32}, label  # master weights
    model, cfg = load_model(read_artifact(run / "moe" / "bam"))
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, out = model.loss(idx[:, :-1], idx[:, 1:])
    assert loss.dtype == torch.float32
    routed = [r for r in out.routing if r is not None]
    assert routed and all(r.ffn_probs.dtype == torch.float32 for r in routed if r.ffn_probs is not None)
    assert all(r.attn_probs.dtype == torch.float32 for r in routed if r.attn_probs is not None)


@pytest.mark.slow  # about 23 s: two processes
def test_the_paper_path_fsdp_bf16_and_the_chunked_loss_trains_a_moe_stage(smoke_copy):
    """trainer=fsdp (two CPU processes, gloo) in bf16-mixed with the LM loss always chunked: paper_590m's path."""
    from cli_runner import cli

    shutil.rmtree(smoke_copy / "smoke" / "moe" / "bam")
    r = cli(smoke_copy, "stage=moe", "mix=bam", "trainer=fsdp_cpu", BF16, "train.chunked_loss_above=0",
            "train.batch_size=2", "train.global_batch_tokens=256", timeout=600)
    assert r.returncode == 0, r.out[-3000:]
    art = smoke_copy / "smoke" / "moe" / "bam"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["config"]["precision"] == "bf16-mixed" and manifest["trainer"]["strategy"] == "fsdp"
    losses = _losses(art)
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    stored = load_file(str(art / "model.safetensors"))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float32}
