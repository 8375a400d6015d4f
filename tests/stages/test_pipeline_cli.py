"""The product end to end: the smoke pipeline through the CLI, skips, staleness, faults, sweeps."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bam_pipeline.store.artifacts import find_model_artifacts, read_artifact, read_train_log
from bam_pipeline.store.layout import RunLayout

from cli_runner import SEED_ARGS, cli, cli_here, kill_when_checkpointed

DOMAINS = ("code", "math", "law")
MOE_RUNS = ("bam", "bam_kv_shared", "btx", "dense")


def test_smoke_pipeline_publishes_every_stage_with_verified_manifests(smoke_run):
    root, result = smoke_run
    run = root / "smoke"
    labels = {a.label for a in find_model_artifacts(RunLayout(run))}
    expected = {"seed", *(f"branch/{d}" for d in DOMAINS), *(f"mix/{v}" for v in MOE_RUNS),
                *(f"moe/{v}" for v in MOE_RUNS), "moe/bam_cm"}
    assert labels == expected
    for art in find_model_artifacts(RunLayout(run)):
        art.verify()
        m = art.manifest
        assert m["config_hash"] and m["versions"]["torch"] and m["tokenizer_hash"]
        assert set(m["files"]) >= {"model.safetensors", "model_config.json"}
    seed = read_artifact(run / "seed" / "main")
    branch = read_artifact(run / "branch" / "code")
    assert branch.manifest["inputs"]["seed"]["hash"] == seed.hash  # chained through manifests
    assert seed.manifest["tokens"] > 0 and seed.manifest["flops"] > 0
    rows = [json.loads(x) for x in (seed.path / "train_log.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and any("loss" in r for r in rows)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    pairs = {(r["model"], r["domain"]) for r in metrics["rows"]}
    assert pairs == {(label, d) for label in (*labels, "btm") for d in ("general", *DOMAINS)}  # BTM: eval only
    routing = json.loads((run / "eval" / "routing.json").read_text())
    assert set(routing) == {label for label in labels if not label.endswith("dense") and label.split("/")[0]
                            in ("mix", "moe")}
    for label, stats in routing.items():
        # every token is dispatched to exactly top-1 expert: fractions are counts over the token count
        assert stats["experts"]["ffn"] == ["seed", *DOMAINS]  # names from the mix stage's manifest
        for per_kind in stats["domains"].values():
            n_tokens = per_kind["ffn"]["tokens"]
            for layer_fracs in per_kind["ffn"]["fraction"]:
                counts = [f * n_tokens for f in layer_fracs]
                assert all(abs(c - round(c)) < 1e-6 for c in counts), (label, counts)
                assert sum(round(c) for c in counts) == n_tokens
    mix_about = read_artifact(run / "mix" / "btx").manifest["about"]
    assert mix_about["expert_origins"] == {"ffn": ["seed", *(f"branch/{d}" for d in DOMAINS)]}
    assert set(read_artifact(run / "mix" / "dense").manifest["inputs"]) == {"seed"}  # no branch it never reads
    assert metrics["rows"][0]["display"] == "Seed"
    report = (run / "report" / "report.md").read_text()
    assert "| data-matched beats compute-matched" in report and "not measurable" not in report
    assert {p.name for p in (run / "report").glob("*.png")} >= {"perplexity.png", "training_loss.png"}
    assert not list(run.rglob("*.tmp-*")), "temporary stage directories left behind"
    assert "pipeline finished" in result.out


def _states(out: str) -> dict[str, tuple[str, str]]:
    """stage=status's rows: label -> (state, detail)."""
    rows = [line.split(None, 2) for line in out.splitlines() if line.startswith("  ")]
    return {cells[0]: (cells[1], cells[2] if len(cells) > 2 else "") for cells in rows}


def test_second_run_skips_every_stage_eval_the_report_and_downstream(smoke_copy):
    run = smoke_copy / "smoke"
    before = {p: p.stat().st_mtime_ns for d in ("eval", "report", "downstream") for p in (run / d).rglob("*")}
    r = cli_here(smoke_copy, "stage=all", check=True)
    assert "training" not in r.out
    for label in ["seed", *(f"branch/{d}" for d in DOMAINS), *(f"mix/{v}" for v in MOE_RUNS),
                  *(f"moe/{v}" for v in MOE_RUNS), "moe/bam_cm", "eval", "report", "downstream"]:
        assert f"{label}: up to date" in r.out
    assert "reusing prepared data" in r.out and "[eval]" not in r.out and "[downstream]" not in r.out
    assert "| Seed" in r.out or "Seed " in r.out  # the Table 1 analogue is still printed
    after = {p: p.stat().st_mtime_ns for d in ("eval", "report", "downstream") for p in (run / d).rglob("*")}
    assert after == before  # nothing rewritten
    states = _states(cli_here(smoke_copy, "stage=status", check=True).out)
    assert [states[k][0] for k in ("eval", "downstream", "report")] == ["fresh"] * 3


def test_eval_report_and_downstream_go_stale_naming_a_retrained_mixture(smoke_copy):
    cli_here(smoke_copy, "stage=moe", "mix=btx", "budget.moe.tokens=1024", check=True)  # a one-off budget
    states = _states(cli_here(smoke_copy, "stage=status", check=True).out)
    for output in ("eval", "downstream", "report"):
        assert states[output][0] == "stale" and "moe/btx" in states[output][1], states[output]
    r = cli_here(smoke_copy, "stage=eval", check=True)
    assert "eval: stale" in r.out and "moe/btx" in r.out.split("eval: stale")[1].splitlines()[0]
    assert "[eval] evaluated: moe/btx" in r.out and "speed of" in r.out  # scored anew; every speed measured
    states = _states(cli_here(smoke_copy, "stage=status", check=True).out)
    # eval scored the model there is; stage=all would still retrain moe/btx at the run's budget first
    assert states["eval"] == ("stale", "moe/btx will be redone first")
    assert states["downstream"][0] == "stale" and "moe/btx" in states["downstream"][1]
    r = cli_here(smoke_copy, "stage=eval", check=True)
    assert "eval: up to date" in r.out and "[eval]" not in r.out
    r = cli_here(smoke_copy, "stage=eval", "eval.rebuild=true", check=True)
    assert "eval: up to date, redoing it (eval.rebuild=true)" in r.out and "speed of" in r.out


def test_changed_config_rebuilds_and_says_why_or_refuses(smoke_copy):
    refused = cli_here(smoke_copy, "stage=moe", "mix=btx", "budget.moe.tokens=1024", "pipeline.on_stale=refuse")
    assert refused.returncode != 0
    assert "stale (config changed: budget" in refused.out and "pipeline.on_stale=rebuild" in refused.out
    before = read_artifact(smoke_copy / "smoke" / "moe" / "btx").hash
    r = cli_here(smoke_copy, "stage=moe", "mix=btx", "budget.moe.tokens=1024", check=True)
    assert "moe/btx: stale (config changed: budget" in r.out and "rebuilding" in r.out
    assert read_artifact(smoke_copy / "smoke" / "moe" / "btx").hash != before


def test_changed_input_is_named(smoke_copy):
    cli_here(smoke_copy, "stage=branch", "domain=code", "budget.branch.tokens=1024", check=True)
    r = cli_here(smoke_copy, "stage=mix", "mix=bam", check=True)
    assert "mix/bam: stale (inputs changed: branch/code" in r.out


def test_corrupt_checkpoint_is_refused_with_one_line(smoke_copy):
    weights = smoke_copy / "smoke" / "seed" / "main" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (smoke_copy / "smoke" / "branch" / "code" / "manifest.json").unlink()  # force a rebuild of the branch
    r = cli_here(smoke_copy, "stage=branch", "domain=code")
    assert r.returncode == 2
    assert "checksum mismatch" in r.out and "Traceback" not in r.out
    assert not (smoke_copy / "smoke" / "branch" / "code" / "manifest.json").exists()


def test_missing_upstream_names_the_command(tmp_path):
    r = cli_here(tmp_path, "stage=seed")
    assert r.returncode == 2 and "stage=data" in r.out and "Traceback" not in r.out


def test_missing_branch_names_the_command(smoke_copy):
    shutil.rmtree(smoke_copy / "smoke" / "branch" / "law")
    r = cli_here(smoke_copy, "stage=mix", "mix=bam_attn_top2")
    assert r.returncode == 2
    assert "run `python -m bam_pipeline stage=branch domain=law experiment=smoke logger=none` first" in r.out
    assert not (smoke_copy / "smoke" / "mix" / "bam_attn_top2").exists()


def test_branch_without_domain_and_unknown_domain(smoke_copy):
    r = cli_here(smoke_copy, "stage=branch")
    assert r.returncode == 2 and "domain=code,math,law" in r.out
    r = cli_here(smoke_copy, "stage=branch", "domain=chemistry")
    assert r.returncode == 2 and "code" in r.out and "law" in r.out  # the known domains are listed


def test_nan_loss_stops_with_a_clear_message(smoke_copy):
    r = cli_here(smoke_copy, "stage=moe", "mix=bam", "train.lr=1e20", "budget.moe.tokens=4096")
    assert r.returncode == 2
    assert "training loss became" in r.out and "Traceback" not in r.out
    # the previous finished artifact is untouched
    read_artifact(smoke_copy / "smoke" / "moe" / "bam").verify()


def test_multirun_sweep_trains_each_variant(smoke_copy):
    r = cli_here(smoke_copy, "-m", "stage=moe", "mix=bam_kv_shared,btx", "budget.moe.tokens=1024", check=True)
    assert "moe/bam_kv_shared: stale" in r.out and "moe/btx: stale" in r.out
    for v in ("bam_kv_shared", "btx"):
        assert read_artifact(smoke_copy / "smoke" / "moe" / v).manifest["budget"]["reference_tokens"] == 1024


def test_compute_matched_moe_sees_fewer_tokens(smoke_copy):
    r = cli_here(smoke_copy, "stage=moe", "mix=bam", "budget.moe.match=compute", check=True)
    assert "moe/bam_cm: up to date" in r.out  # the same run as `bam_cm` in pipeline.moe_runs
    run = smoke_copy / "smoke"
    cm, dm = read_artifact(run / "moe" / "bam_cm"), read_artifact(run / "moe" / "bam")
    assert cm.manifest["tokens"] < dm.manifest["tokens"]
    btx = read_artifact(run / "moe" / "btx")
    per_step = cm.manifest["budget"]["train_flops"] / cm.manifest["budget"]["steps"]
    assert abs(cm.manifest["flops"] - btx.manifest["flops"]) <= per_step


# Paper Tables 4, 5 and 9 (590M scale): (total, active) parameters as the paper rounds them, and ours exactly.
PAPER_PARAMS = {
    "dense": ((590e6, 590e6), (587_209_728, 587_209_728)),
    "bam": ((776e6, 663e6), (776_002_560, 662_756_352)),
    "btx": ((700e6, 587e6), (700_480_512, 587_234_304)),
    "btx_matched": ((776e6, 662e6), (775_990_272, 662_744_064)),
    # Table 4: BTX top-1 with 6 FFN experts (4 mixed + 2 seed copies): BAM's 776M total, 587M active
    "btx_e6": ((776e6, 587e6), (775_990_272, 587_246_592)),
}


PAPER_VOCAB = "data.tokenizer.vocab_size=256000"  # Table 8's; the run's tokenizer sets the model's vocabulary


def _params(out: str) -> list[tuple[int, int]]:
    """(total, active) of each model stage=info printed, in order."""
    found = re.findall(r"parameters: total \S+ \(([\d,]+)\), active per token \S+ \(([\d,]+)\)", out)
    return [(int(t.replace(",", "")), int(a.replace(",", ""))) for t, a in found]


@pytest.mark.parametrize("mix", ["bam", "btx", "btx_matched", "btx_e6"])
def test_info_prints_the_paper_parameter_counts_without_data(tmp_path, mix):
    r = cli_here(tmp_path, "stage=info", "model=bam-590m", f"mix={mix}", "experiment=tiny", PAPER_VOCAB, check=True)
    (dense, mixed) = _params(r.out)
    assert dense == PAPER_PARAMS["dense"][1] and mixed == PAPER_PARAMS[mix][1]
    for ours, paper in zip(mixed, PAPER_PARAMS[mix][0]):
        assert abs(ours - paper) / paper < 0.01  # the paper's 3-digit rounding of the same count
    made = {p.name for p in (tmp_path / "tiny").iterdir()} if (tmp_path / "tiny").exists() else set()
    assert made <= {"logs"}, made  # no data prepared, no model trained


def test_a_sweep_runs_each_job_and_refuses_an_appended_key_the_config_lacks(tmp_path):
    r = cli_here(tmp_path, "-m", "stage=info", "domain=code,math", check=True)
    assert r.out.count("parameters: total") >= 2  # one stage=info per job
    r = cli_here(tmp_path, "-m", "stage=info", "domain=code,math", "+domian=law")
    errors = [line for line in r.out.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 2, r.out  # every job fails, one line each (tests/stages/test_sweeps.py)
    for job, line in enumerate(errors):
        assert line.startswith(f"error: job {job} (") and "did you mean domain=law?" in line, line


def test_hydra_cfg_job_and_help(tmp_path):
    r = cli_here(tmp_path, "--cfg", "job", check=True)
    assert "stage: all" in r.out and "mix_variants" in r.out
    r = cli_here(tmp_path, "--help", check=True)
    assert "mix: " in r.out and "trainer: " in r.out


def _seed_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "seed" / "main" / "model.safetensors"))


def test_killed_stage_resumes_to_the_uninterrupted_result(smoke_run, reference_seed, tmp_path):
    root, _ = smoke_run
    killed_root = tmp_path / "killed"
    shutil.copytree(root / "smoke" / "data", killed_root / "smoke" / "data")
    kill_when_checkpointed(killed_root, list(SEED_ARGS), "seed/main")

    r = cli_here(killed_root, *SEED_ARGS, check=True)  # the resume needs no signal: in this process
    assert "resuming from" in r.out
    ref, res = load_file(str(reference_seed)), _seed_weights(killed_root / "smoke")
    for k in ref:
        torch.testing.assert_close(res[k], ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~30 s: two DDP processes, killed and resumed
def test_two_process_cpu_ddp_stage_writes_once_and_resumes(smoke_run, tmp_path):
    root, _ = smoke_run
    shutil.copytree(root / "smoke" / "data", tmp_path / "smoke" / "data")
    args = ["stage=seed", "trainer=ddp_cpu", "train.global_batch_tokens=512", "budget.seed.tokens=32768",
            "train.val_every=8", "experiment=smoke", "logger=none"]
    kill_when_checkpointed(tmp_path, args, "seed/main")
    r = cli(tmp_path, *args, check=True, timeout=600)
    assert "resuming from" in r.out and "Traceback" not in r.out
    art = read_artifact(tmp_path / "smoke" / "seed" / "main")
    art.verify()
    assert art.manifest["budget"]["tokens_per_step"] == 2 * 4 * 64  # two processes x batch 4 x 64 tokens
    assert art.manifest["batch"] == {"global_batch_tokens": 512, "devices": 2, "batch_size": 4, "accumulate": 1}
    steps = [row["step"] for row in read_train_log(art) if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == art.manifest["budget"]["steps"]
    assert not list(tmp_path.rglob("*.tmp-*")) and not (tmp_path / "smoke" / ".work" / "seed" / "main").exists()


@pytest.mark.slow
def test_tiny_experiment_learns_what_the_method_predicts(tmp_path):
    """`make full-run`'s pipeline (7-15 minutes here): experts specialise, mixing then training helps."""
    cli(tmp_path, "stage=all", "experiment=tiny", check=True, timeout=1800)
    rows = json.loads((tmp_path / "tiny" / "eval" / "metrics.json").read_text())["rows"]
    ppl = {(r["model"], r["domain"]): r["perplexity"] for r in rows}
    for d in DOMAINS:
        assert ppl[(f"branch/{d}", d)] < ppl[("seed", d)]  # each expert beats the seed in its domain
    for v in ("bam", "bam_kv_shared", "btx"):
        trained = sum(ppl[(f"moe/{v}", d)] for d in ("general", *DOMAINS))
        untrained = sum(ppl[(f"mix/{v}", d)] for d in ("general", *DOMAINS))
        seed = sum(ppl[("seed", d)] for d in ("general", *DOMAINS))
        assert trained < untrained and trained < seed


def test_training_on_data_prepared_for_another_config_is_refused(smoke_copy):
    r = cli_here(smoke_copy, "stage=seed", "data.split.val=0.2")
    assert r.returncode == 2
    line = next(x for x in r.out.splitlines() if x.startswith("error:"))
    assert "is not this run's (data config changed: split)" in line, line  # names what changed
    assert "run `python -m bam_pipeline stage=data data.split.val=0.2 experiment=smoke logger=none`" in line, line


def _memory_rows(out: str) -> dict[str, list[str]]:
    """stage=info's memory table: stage -> its cells after the model."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in ("seed", "branch", "moe") and cells[-1] in ("yes", "NO"):
            rows[cells[0]] = cells
    return rows


def test_info_plans_memory_for_a_gpu_trainer_on_a_cpu_machine(tmp_path):
    r = cli_here(tmp_path, "stage=info", "experiment=paper_590m", "trainer=fsdp", "trainer.devices=8",
                 "trainer.activation_checkpointing=true", check=True)
    assert "strategy=fsdp on 8 process(es), precision bf16-mixed" in r.out and "fits 80.0 GB" in r.out
    assert set(_memory_rows(r.out)) == {"seed", "branch", "moe"} and "assumptions:" in r.out
    assert all(cells[-1] == "yes" for cells in _memory_rows(r.out).values())
    big = cli_here(tmp_path, "stage=info", "experiment=paper_590m", "model=bam-2b", "mix=bam", "trainer.devices=8",
                   "info.device_memory=80GB", check=True)
    assert _memory_rows(big.out)["moe"][-1] == "NO"  # 6.2B parameters replicated with AdamW: over 80 GB
    assert "no speeds measured on this machine" in big.out and "make bench" in big.out


def test_info_projects_wall_time_from_measured_speeds(tmp_path):
    from bam_pipeline.training.speeds import SpeedTable

    layouts = ("dense", "bam", "bam_kv_shared", "btx")
    SpeedTable(machine="test machine", measured="today", device="cpu", dtype="float32", torch="x",
               batch={f"tiny/{k}": [16, 256] for k in layouts},
               train_tokens_per_s={f"tiny/{k}": 1000.0 for k in layouts},
               forward_tokens_per_s={f"tiny/{k}": 4000.0 for k in layouts}).write(tmp_path / "speeds.json")
    r = cli_here(tmp_path, "stage=info", "experiment=tiny", check=True)
    # seed: 1,024,000 tokens at 1000 tokens/s + 10 validations of 16,384 tokens at 4000 tokens/s = 1065 s
    seed = next(line for line in r.out.splitlines() if line.strip().startswith("seed ") and "tiny/dense" in line)
    assert seed.split()[-2:] == ["18", "min"] and "measured on test machine" in r.out


def test_info_sizes_the_model_with_the_runs_tokenizer(tmp_path, smoke_copy):
    """The vocabulary comes from the run's tokenizer, never the preset's placeholder: the one the data
    stage trains before data exists, the prepared one after; stage=info says which."""
    r = cli_here(tmp_path, "stage=info", "experiment=smoke", check=True)
    assert r.out.splitlines()[0].startswith("vocabulary: 512 tokens, from data.tokenizer.vocab_size"), r.out[:300]
    assert "V=512" in r.out
    prepared = json.loads((smoke_copy / "smoke" / "data" / "manifest.json").read_text())["vocab_size"]
    r = cli_here(smoke_copy, "stage=info", check=True)
    assert r.out.splitlines()[0].startswith(f"vocabulary: {prepared:,} tokens, from the run's prepared tokenizer")
    assert f"V={prepared}" in r.out


def test_lightning_banners_stay_out_of_the_stage_output(smoke_run):
    """Lightning sets its loggers to INFO when it is imported, which the stages do late (cli.quiet_lightning)."""
    _, r = smoke_run
    assert "GPU available" not in r.out and "Tip:" not in r.out and "Initializing distributed" not in r.out
