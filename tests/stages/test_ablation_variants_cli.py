"""The routing-ablation variants through the real stages on the smoke run: mix (with the prepared data
as an input where the variant reads it), moe training, and the defining property of each artifact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bam_pipeline.data.prepare import open_prepared
from bam_pipeline.data.storage import load_split_sequences, mixture_token_frequencies
from bam_pipeline.mixing.upcycle import hash_table
from bam_pipeline.store.artifacts import load_model, read_artifact

from cli_runner import cli_here

EXPERTS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3")


def weights(run: Path, stage: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / stage / name / "model.safetensors"))


def held_out_loss(run: Path, stage: str, name: str) -> float:
    """Mean next-token loss on the first validation windows of every source (eval mode)."""
    prepared = open_prepared(run / "data", verify=False)
    model, _ = load_model(read_artifact(run / stage / name))
    seqs = torch.cat([load_split_sequences(prepared, s, "val", 64, 8 * 65) for s in prepared.sources])
    with torch.no_grad():
        return model.loss(seqs[:, :-1], seqs[:, 1:])[0].item()


def build(root: Path, name: str, *extra: str) -> None:
    cli_here(root, "stage=mix", f"mix={name}", check=True)
    cli_here(root, "stage=moe", f"mix={name}", *extra, check=True)


def test_frozen_experts_stay_bit_identical_through_the_moe_stage(smoke_copy):
    run = smoke_copy / "smoke"
    build(smoke_copy, "bam_frozen")
    mixed, trained = weights(run, "mix", "bam_frozen"), weights(run, "moe", "bam_frozen")
    experts = [k for k in mixed if k.endswith(EXPERTS) and mixed[k].shape[0] > 1]
    assert len(experts) == 2 * 7 and all(torch.equal(trained[k], mixed[k]) for k in experts)
    routers = [k for k in mixed if k.endswith("router.weight")]
    assert routers and all(not torch.equal(trained[k], mixed[k]) for k in routers)
    assert not torch.equal(trained["tok_emb.weight"], mixed["tok_emb.weight"])  # averaged weights train
    assert held_out_loss(run, "moe", "bam_frozen") < held_out_loss(run, "mix", "bam_frozen")
    art = read_artifact(run / "moe" / "bam_frozen")
    assert art.manifest["config"]["freeze_experts"] is True
    assert art.manifest["about"]["display"] == "BAM (expert KV, frozen experts)"
    assert "freeze_experts" not in read_artifact(run / "moe" / "bam").manifest["config"]  # others as before


def test_hash_mixture_reads_the_data_and_trains_with_its_table(smoke_copy):
    run = smoke_copy / "smoke"
    build(smoke_copy, "bam_hash")
    mix = read_artifact(run / "mix" / "bam_hash")
    assert "data" in mix.manifest["inputs"] and "data" not in read_artifact(run / "mix" / "bam").manifest["inputs"]
    # the balanced table of the moe mixture's token frequencies, in every layer, kept by training
    prepared = open_prepared(run / "data", verify=False)
    trained_on = [s for s in prepared.sources if s not in prepared.ood]  # general + 3 domains: 25% each in moe
    mixture = {s: 1 / len(trained_on) for s in trained_on}
    freq = torch.from_numpy(mixture_token_frequencies(prepared, mixture))
    want = hash_table(prepared.vocab_size, 4, kind="balanced", frequencies=freq)
    mixed, trained = weights(run, "mix", "bam_hash"), weights(run, "moe", "bam_hash")
    for i in range(2):
        assert torch.equal(mixed[f"layers.{i}.ffn.router.table"], want)
        assert trained[f"layers.{i}.ffn.router.table"].dtype == torch.int64
        assert torch.equal(trained[f"layers.{i}.ffn.router.table"], want)
    assert not any(k.endswith("ffn.router.weight") for k in trained)
    assert held_out_loss(run, "moe", "bam_hash") < held_out_loss(run, "mix", "bam_hash")


def test_a_changed_data_input_makes_a_data_reading_mixture_stale(smoke_copy):
    run = smoke_copy / "smoke"
    cli_here(smoke_copy, "stage=mix", "mix=bam_router_hidden", check=True)
    manifest = run / "data" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["hash"] = "0" * 64  # the prepared data as another run of stage=data would have made it
    manifest.write_text(json.dumps(m))
    r = cli_here(smoke_copy, "stage=mix", "mix=bam_router_hidden", "pipeline.on_stale=refuse")
    errors = [line for line in r.out.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.out[-2000:]
    # the stale mixture, the input that changed, and the override that rebuilds it
    assert "mix/bam_router_hidden" in errors[0] and re.search(r"\bdata\b", errors[0]), errors[0]
    assert "pipeline.on_stale=rebuild" in errors[0], errors[0]
    assert "up to date" in cli_here(smoke_copy, "stage=mix", "mix=bam", check=True).out  # reads no data


def test_expert_choice_trains_thresholds_and_evaluates_causally(smoke_copy):
    run = smoke_copy / "smoke"
    build(smoke_copy, "bam_expert_choice")
    assert torch.isnan(weights(run, "mix", "bam_expert_choice")["layers.0.ffn.router.threshold"]).all()
    trained = weights(run, "moe", "bam_expert_choice")
    for i in range(2):
        t = trained[f"layers.{i}.ffn.router.threshold"]
        assert torch.isfinite(t).all() and ((t > 0) & (t < 1)).all()
    model, _ = load_model(read_artifact(run / "moe" / "bam_expert_choice"))  # eval mode
    prepared = open_prepared(run / "data", verify=False)
    a = load_split_sequences(prepared, "code", "val", 64, 4 * 65)[:, :-1]
    b = a.clone()
    b[:, 40:] = a.flip(0)[:, 40:]
    with torch.no_grad():
        torch.testing.assert_close(model(a).logits[:, :40], model(b).logits[:, :40], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,routers", [
    ("bam_router_shared_layers", ["layers.0.attn.router.weight", "layers.0.ffn.router.weight"]),
    ("bam_router_joint", ["layers.0.router.weight", "layers.1.router.weight"]),
    ("bam_router_hidden", None), ("btx_top2", None), ("btx_e5", None), ("btx_e8", None),
])
def test_every_other_new_variant_mixes_and_trains(smoke_copy, name, routers):
    run = smoke_copy / "smoke"
    build(smoke_copy, name, "budget.moe.tokens=1024")
    trained = weights(run, "moe", name)
    if routers is not None:
        assert sorted(k for k in trained if "router" in k) == routers
    assert held_out_loss(run, "moe", name) < held_out_loss(run, "mix", name)
    r = cli_here(smoke_copy, "stage=info", f"mix={name}", check=True)
    assert re.search(r"parameters: total", r.out)


def test_info_prints_ideal_and_implemented_flops_of_topk_attention(tmp_path):
    r = cli_here(tmp_path, "stage=info", "model=bam-590m", "mix=bam_attn_top2", "experiment=tiny",
                 "data.tokenizer.vocab_size=256000", check=True)
    ideal = re.search(r"forward FLOPs per token at context 2048: (\S+) ", r.out.split("bam_attn_top2")[1]).group(1)
    implemented = re.search(r"as implemented here \(every attention expert computed.*?\): (\S+) ", r.out).group(1)
    assert (ideal, implemented) == ("801.23M", "901.92M")  # top-2 of 4 vs all 4 attention experts
    soft = cli_here(tmp_path, "stage=info", "model=bam-590m", "mix=bam", "experiment=tiny", check=True)
    assert "as implemented here" not in soft.out  # soft routing computes every expert either way
