"""run_eval on the tiny fake run: every (model, domain) row, perplexity checked independently,
function-preserving mixture = seed, routing fractions, skips, cache reuse."""

import json
import shutil
import math

import pytest
import torch
import torch.nn.functional as F
from eval_runs import save_artifact

from bam_pipeline.data.prepare import open_prepared
from bam_pipeline.data.storage import load_split_sequences
from bam_pipeline.errors import BamError
from bam_pipeline.store.layout import RunLayout
from bam_pipeline.eval.runner import run_eval, sources_with_test_split
from bam_pipeline.model import BAMTransformer
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.store.artifacts import load_state, read_artifact

MODELS = ("seed", "branch/code", "branch/law", "mix/bam", "btm")
SOURCES = ("general", "code", "law")  # the fake run's sources (conftest.py)
SEQ_LEN = 32  # the fake run's eval.seq_len (conftest.py)


@pytest.fixture(scope="module")
def evaluated(fake_run, eval_cfg):
    path = run_eval(eval_cfg(), RunLayout(fake_run), general="general")
    return json.loads(path.read_text()), json.loads((fake_run / "eval" / "routing.json").read_text())


def rows_by(metrics):
    return {(r["model"], r["domain"]): r for r in metrics["rows"]}


def test_every_model_domain_pair(evaluated):
    metrics, _ = evaluated
    assert set(rows_by(metrics)) == {(m, d) for m in MODELS for d in SOURCES}
    for r in metrics["rows"]:
        assert r["tokens"] > 0 and r["tokens"] % SEQ_LEN == 0
        assert r["params_active"] <= r["params_total"] and r["flops_per_token"] > 0 and r["tokens_per_s"] > 0
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / r["bytes"])


def test_per_document_losses_add_up_to_every_row(evaluated, fake_run):
    metrics, _ = evaluated
    docs = json.loads((fake_run / "eval" / "documents.json").read_text())
    for r in metrics["rows"]:
        per_doc = docs["models"][r["model"]][r["domain"]]
        assert len(per_doc["nll"]) == len(docs["sources"][r["domain"]])
        assert sum(per_doc["tokens"]) == r["tokens"]
        assert sum(per_doc["nll"]) == pytest.approx(r["loss"] * r["tokens"], rel=1e-9)


def test_btm_ensembles_the_seed_and_the_experts_within_the_bayes_bound(evaluated, fake_run):
    """Bayesian model averaging: per (row, document) segment, NLL_btm <= min_j (NLL_j - log prior_j); so over
    a source the ensemble is at most the best model plus one prior penalty per segment."""
    from bam_pipeline.data.storage import load_eval_sequences

    metrics, _ = evaluated
    rows = rows_by(metrics)
    prepared = open_prepared(fake_run / "data")
    singles = ("seed", "branch/code", "branch/law")
    for source in SOURCES:
        btm = rows[("btm", source)]
        assert btm["btm_models"] == list(singles) and btm["role"] == "ensemble"
        assert btm["flops_per_token"] == pytest.approx(sum(rows[(m, source)]["flops_per_token"] for m in singles))
        assert sum(btm["btm_prior"]) == pytest.approx(1.0) and min(btm["btm_prior"]) > 0
        test = load_eval_sequences(prepared, source, "test", SEQ_LEN, max_tokens=1024)
        segments = len({(i, int(d)) for i, row in enumerate(test.documents[:, 1:]) for d in row})
        bound = min(rows[(m, source)]["loss"] * rows[(m, source)]["tokens"] for m in singles)
        bound += segments * max(-math.log(p) for p in btm["btm_prior"])
        assert btm["loss"] * btm["tokens"] <= bound + 1e-6
        assert btm["loss"] < max(rows[(m, source)]["loss"] for m in singles)


def test_perplexity_matches_an_independent_loop(evaluated, fake_run):
    metrics, _ = evaluated
    cfg, state = load_state(read_artifact(fake_run / "seed" / "main"))
    model = BAMTransformer(cfg).eval()
    model.load_state_dict(state)
    prepared = open_prepared(fake_run / "data")
    for source in SOURCES:
        seqs = load_split_sequences(prepared, source, "test", SEQ_LEN, max_tokens=1024)
        with torch.no_grad():
            logits = model(seqs[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))
        row = rows_by(metrics)[("seed", source)]
        assert row["tokens"] == seqs[:, 1:].numel()
        assert row["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
        # bits per byte over the bytes of the text the scored tokens decode to (this corpus is ASCII: a row's
        # targets decode to whole characters), not the split's bytes scaled by the token fraction
        tok = prepared.tokenizer()
        text = sum(len(tok.decode(r[1:].tolist(), skip_special_tokens=True).encode()) for r in seqs)
        assert row["bytes"] == text
        assert row["bits_per_byte"] == pytest.approx(loss.item() * row["tokens"] / math.log(2) / text, rel=1e-5)


def test_identical_expert_mixture_scores_the_seed(evaluated):
    rows = rows_by(evaluated[0])
    for source in SOURCES:
        assert rows[("mix/bam", source)]["perplexity"] == pytest.approx(rows[("seed", source)]["perplexity"], rel=1e-4)
        assert rows[("branch/code", source)]["perplexity"] != pytest.approx(rows[("seed", source)]["perplexity"],
                                                                           rel=1e-4)


def test_routing_fractions_sum_to_one_per_layer(evaluated):
    _, routing = evaluated
    assert set(routing) == {"mix/bam"}  # dense models have no routers
    entry = routing["mix/bam"]
    assert set(entry["domains"]) == set(SOURCES)
    assert entry["experts"] == {"attn": ["seed", "seed+1", "seed+2"], "ffn": ["seed", "seed+1", "seed+2"]}
    assert entry["display"] == "Untrained BAM (renormalised)"  # from the manifest, not the label
    for stats in entry["domains"].values():
        for kind, key in (("attn", "mean_prob"), ("ffn", "fraction"), ("ffn", "mean_prob")):
            assert len(stats[kind][key]) == 2  # smoke preset: 2 layers
            for per_layer in stats[kind][key]:
                assert sum(per_layer) == pytest.approx(1.0, abs=1e-5)
        for h in stats["attn"]["entropy"] + stats["ffn"]["entropy"]:
            assert 0.0 <= h <= math.log(3) + 1e-6


def test_heatmaps_written(evaluated, fake_run):
    assert (fake_run / "eval" / "routing_mix_bam_attn.png").stat().st_size > 0
    assert (fake_run / "eval" / "routing_mix_bam_ffn.png").stat().st_size > 0


def test_a_rerun_keeps_the_heatmaps_of_unchanged_routing_and_redraws_the_rest(run_copy, eval_cfg):
    layout = RunLayout(run_copy)
    run_eval(eval_cfg(), layout, general="general")
    png = layout.heatmap("mix/bam", "ffn")
    png.write_bytes(b"kept")  # a marker: redrawn, it would be a PNG again
    run_eval(eval_cfg(), layout, general="general")  # the same routing: kept, touched
    assert png.read_bytes() == b"kept" and png.stat().st_mtime_ns >= layout.routing.stat().st_mtime_ns
    run_eval(eval_cfg(max_tokens_per_source=512), layout, general="general")  # other tokens: other routing
    assert png.read_bytes().startswith(b"\x89PNG")


def test_rerun_reuses_the_cache_and_reevaluates_what_changed(run_copy, capsys, eval_cfg):
    first = json.loads(run_eval(eval_cfg(), RunLayout(run_copy), general="general").read_text())
    assert first["reused"] == [] and set(first["evaluated"]) == set(MODELS)
    capsys.readouterr()
    again = json.loads(run_eval(eval_cfg(), RunLayout(run_copy), general="general").read_text())
    assert set(again["reused"]) == set(MODELS) and again["evaluated"] == []
    out = capsys.readouterr().out
    assert "reused cached results for" in out and "measured afresh" in out

    def scores(metrics):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics["rows"]]

    assert scores(again) == scores(first)
    # speed is never cached: every model measured again, in interleaved rounds, in this run; BTM runs
    # its members one after another, so its tokens/s follows from theirs
    singles = set(MODELS) - {"btm"}
    assert set(again["speed"]["models"]) == singles
    for label, speed in again["speed"]["models"].items():
        assert len(speed["rounds"]) == again["speed"]["rounds"] and speed != first["speed"]["models"][label]
    members = again["speed"]["models"]
    for r in again["rows"]:
        want = (1 / sum(1 / members[m]["tokens_per_s"] for m in r["btm_models"]) if r["model"] == "btm"
                else members[r["model"]]["tokens_per_s"])
        assert r["tokens_per_s"] == pytest.approx(want)
    changed = json.loads(run_eval(eval_cfg(max_tokens_per_source=512), RunLayout(run_copy), general="general").read_text())
    assert set(changed["evaluated"]) == set(MODELS)
    assert len(list((run_copy / "eval" / "cache").glob("*.json"))) == len(MODELS)  # stale entries pruned


def test_checksum_mismatch_is_skipped(run_copy, capsys, eval_cfg):
    weights = run_copy / "branch" / "law" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    metrics = json.loads(run_eval(eval_cfg(), RunLayout(run_copy), general="general").read_text())
    assert "skip branch/law: checksum mismatch" in capsys.readouterr().out
    assert not any(r["model"] == "branch/law" for r in metrics["rows"])
    assert [s["name"] for s in metrics["skipped"] if s["kind"] == "model"] == ["branch/law"]


def test_no_model_is_a_bam_error(run_copy, eval_cfg):
    for stage in ("seed", "branch", "mix"):
        shutil.rmtree(run_copy / stage)
    with pytest.raises(BamError, match=r"no trained model in .*stage=seed"):
        run_eval(eval_cfg(), RunLayout(run_copy), general="general")


def test_seq_len_longer_than_the_model_is_a_bam_error(run_copy, eval_cfg):
    with pytest.raises(BamError, match="exceeds seed's max_seq_len=64"):
        run_eval(eval_cfg(seq_len=128), RunLayout(run_copy), general="general")


def test_source_without_test_split_is_skipped():
    class P:
        sources = ["general", "code"]
        stats = {"general": {"train": {"tokens": 5}, "test": {"tokens": 9}}, "code": {"train": {"tokens": 5}}}

    ok, skipped = sources_with_test_split(P())
    assert ok == ["general"]
    assert skipped == [{"kind": "source", "name": "code", "reason": "source 'code' has no test split"}]


def test_model_config_roundtrip_of_the_mixture(fake_run):
    cfg = ModelConfig.from_dict(json.loads((fake_run / "mix" / "bam" / "model_config.json").read_text()))
    assert cfg.attn_experts == 3 and cfg.ffn_router.renormalize


def test_descriptions_come_from_the_manifest(tmp_path):
    from bam_pipeline.eval.names import about, expert_names
    from bam_pipeline.store.artifacts import Artifact

    def art(stage, name, **manifest):
        return Artifact(tmp_path / stage / name, {"stage": stage, "name": name, "hash": "h", "files": {}, **manifest})

    described = about(art("moe", "bam_cm", about={"display": "BAM CM (expert KV)", "role": "mixture",
                                                   "experts": {"ffn": ["seed", "code", "seed+1"]}}))
    assert (described.display, described.role) == ("BAM CM (expert KV)", "mixture")
    assert expert_names(described, "ffn", 3) == ["seed", "code", "seed+1"]
    assert expert_names(described, "ffn", 4) == ["e0", "e1", "e2", "e3"]  # count differs: no guessing
    assert expert_names(described, "attn", 2) == ["e0", "e1"]
    plain = about(art("branch", "law"))  # no description: named by its label, role by its stage
    assert (plain.display, plain.role, plain.domain) == ("branch/law", "expert", "law")
    assert about(art("moe", "dense", about={"display": "Dense", "role": "dense"})).role == "dense"


def test_uniform_attention_probe_averages_the_attention_experts(run_copy, eval_cfg):
    """A mixture with distinct experts and a trained-looking router, scored again with its soft attention weights
    forced uniform: its own row (role probe), equal to an independent loop over the zeroed-router model, and
    different from the mixture; for identical experts the probe changes nothing (averaging copies is exact)."""
    from bam_pipeline.data.prepare import open_prepared as _open
    from bam_pipeline.eval.runner import UNIFORM_ATTENTION, probe_label, uniform_attention

    prepared = _open(run_copy / "data")
    cfg, _ = load_state(read_artifact(run_copy / "mix" / "bam"))
    torch.manual_seed(3)
    model = BAMTransformer(cfg)
    with torch.no_grad():
        for block in model.layers:
            block.attn.router.weight.mul_(200.0)  # peaked attention weights: far from uniform
    save_artifact(run_copy, "moe", "x", cfg, model.state_dict(), prepared, about={"display": "X", "role": "mixture"})
    spec = eval_cfg(uniform_attention=["moe/x", "mix/bam", "moe/nope"], btm=False)
    metrics = json.loads(run_eval(spec, RunLayout(run_copy), general="general").read_text())
    rows = rows_by(metrics)
    probe = probe_label("moe/x", UNIFORM_ATTENTION)
    assert {r["role"] for r in metrics["rows"] if r["model"] == probe} == {"probe"}
    assert uniform_attention(model) == cfg.n_layers
    test = load_split_sequences(open_prepared(run_copy / "data"), "code", "test", SEQ_LEN, max_tokens=1024)
    with torch.no_grad():
        logits = model.eval()(test[:, :-1]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), test[:, 1:].flatten()).exp().item()
    assert rows[(probe, "code")]["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert rows[(probe, "code")]["perplexity"] != pytest.approx(rows[("moe/x", "code")]["perplexity"], rel=1e-3)
    same = probe_label("mix/bam", UNIFORM_ATTENTION)
    for source in SOURCES:
        assert rows[(same, source)]["perplexity"] == pytest.approx(rows[("mix/bam", source)]["perplexity"], rel=1e-5)
    documents = json.loads((run_copy / "eval" / "documents.json").read_text())["models"]
    assert set(documents[probe]) == set(SOURCES)
    assert any(x["name"] == "moe/nope+uniform_attn" and "not trained" in x["reason"] for x in metrics["skipped"])



def _republish(run, stage, name, change) -> None:
    """Publish ``stage/name`` again with ``change`` applied to its weights (a consistent manifest: only its
    weights are wrong, as an older version or an import would have published them)."""
    art = read_artifact(run / stage / name)
    cfg, state = load_state(art)
    change(state)
    save_artifact(run, stage, name, cfg, state, open_prepared(run / "data", verify=False))


def test_weights_that_are_not_finite_are_refused_by_name_before_any_model_is_scored(run_copy, eval_cfg):
    _republish(run_copy, "branch", "law", lambda s: s["layers.0.ffn.w1"].view(-1)[:3].fill_(math.nan))
    with pytest.raises(BamError) as err:
        run_eval(eval_cfg(), RunLayout(run_copy), general="general")
    msg = str(err.value)
    assert msg.startswith(f"branch/law ({run_copy / 'branch' / 'law'}) has weights that are not finite: 3 ")
    assert "`stage=branch domain=law`" in msg
    assert not (run_copy / "eval" / "cache").exists() and not (run_copy / "eval" / "metrics.json").exists()


def test_a_loss_that_is_not_finite_is_refused_and_never_cached(run_copy, eval_cfg):
    """Finite weights whose forward pass overflows; and a NaN row an older version cached, removed."""
    layout = RunLayout(run_copy)
    run_eval(eval_cfg(), layout, general="general")
    cached = sorted((run_copy / "eval" / "cache").glob("seed-main-*.json"))
    assert len(cached) == 1
    row = json.loads(cached[0].read_text())
    row["rows"][1]["loss"] = math.nan
    cached[0].write_text(json.dumps(row))
    metrics = (run_copy / "eval" / "metrics.json").read_text()
    with pytest.raises(BamError, match=r"^seed gives a test loss of nan on code though its weights are finite"):
        run_eval(eval_cfg(), layout, general="general")
    assert not cached[0].exists() and (run_copy / "eval" / "metrics.json").read_text() == metrics

    _republish(run_copy, "branch", "code", lambda s: s["norm.weight"].fill_(3e38))
    before = set((run_copy / "eval" / "cache").glob("branch-code-*.json"))  # its results before the change
    with pytest.raises(BamError) as err:
        run_eval(eval_cfg(), layout, general="general")
    assert str(err.value).startswith("branch/code gives a test loss of nan on general though its weights are finite")
    assert "none of its results is cached or written" in str(err.value)
    assert set((run_copy / "eval" / "cache").glob("branch-code-*.json")) == before
    assert (run_copy / "eval" / "metrics.json").read_text() == metrics


def test_an_eval_budget_below_one_sequence_names_the_minimum_before_scoring(run_copy, eval_cfg):
    """Each scored position needs the token after it: one eval sequence of seq_len positions takes seq_len + 1
    tokens. A smaller eval.max_tokens_per_source is refused in one line naming that minimum, before any model
    is scored or cached (not a per-source skip blaming the test split, which holds thousands of tokens)."""
    with pytest.raises(BamError) as e:  # the models' max_seq_len (64, the smoke preset) with eval.seq_len=null
        run_eval(eval_cfg(seq_len=None, max_tokens_per_source=64), RunLayout(run_copy), general="general")
    assert "eval.max_tokens_per_source=64" in str(e.value) and "at least 65" in str(e.value), e.value
    assert not (run_copy / "eval").exists()
    with pytest.raises(BamError) as e:  # eval.seq_len given: refused where the config is read
        eval_cfg(seq_len=SEQ_LEN, max_tokens_per_source=SEQ_LEN)
    assert "max_tokens_per_source=32" in str(e.value) and f"at least {SEQ_LEN + 1}" in str(e.value), e.value
    eval_cfg(seq_len=SEQ_LEN, max_tokens_per_source=SEQ_LEN + 1)  # one sequence is enough to start


def test_a_capped_split_names_the_cap_not_the_split_size(fake_run):
    with pytest.raises(BamError) as e:
        load_split_sequences(open_prepared(fake_run / "data"), "code", "test", SEQ_LEN, max_tokens=SEQ_LEN)
    assert f"at most {SEQ_LEN} tokens" in str(e.value) and f"at least {SEQ_LEN + 1}" in str(e.value), e.value


def test_score_rows_and_cache_entries_write_back_the_json_they_were_read_from(evaluated, fake_run):
    """metrics.json's rows and the eval cache's entries, read as ScoreRow / ModelScores, serialise to the same
    JSON, keys in order: the BTM keys on BTM's rows only, the timing keys only where measured (not cached)."""
    from bam_pipeline.eval.scores import ModelScores, ScoreRow

    metrics, _ = evaluated
    for r in metrics["rows"]:
        assert list(ScoreRow.from_dict(r).to_dict().items()) == list(r.items())
    plain = ["model", "stage", "name", "display", "role", "artifact_hash", "domain", "tokens", "bytes", "loss",
             "perplexity", "bits_per_byte", "params_total", "params_active", "flops_per_token", "seq_len", "device",
             "tokens_trained"]
    rows = rows_by(metrics)
    assert list(rows[("seed", "code")]) == [*plain, "tokens_per_s", "wall_time"]
    assert list(rows[("btm", "code")]) == [*plain, "btm_models", "btm_prior", "tokens_per_s", "wall_time"]
    entries = sorted((fake_run / "eval" / "cache").glob("*.json"))
    assert len(entries) == len(MODELS)
    for entry in entries:
        text = entry.read_text()
        scores = ModelScores.from_dict(json.loads(text))
        assert all(r.timing is None for r in scores.rows)
        assert json.dumps(scores.to_dict(), indent=2) + "\n" == text
    with pytest.raises(BamError, match=r"score the run again .*eval\.rebuild=true"):
        ScoreRow.from_dict({**metrics["rows"][0], "loss_nats": 1.0})
