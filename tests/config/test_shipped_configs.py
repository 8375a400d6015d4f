"""Every shipped config composes into typed specs and builds what it names: experiments into a run
context, trainers into a Lightning Trainer (or a valid Trainer signature), loggers into loggers that
are offline by default and online when asked, the SLURM launcher into a real sbatch script."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import lightning as L
import pytest
from hydra.utils import instantiate

from bam_pipeline.config.files import group_options
from bam_pipeline.config.reading import plain
from bam_pipeline.model.config import PRESETS
from bam_pipeline.training.parallel import trainer_kwargs
from bam_pipeline.ranks import world_size
from composed import compose_config, run_context


_compose, context = compose_config, run_context


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_reads_into_typed_specs(experiment):
    ctx = context(f"experiment={experiment}")
    assert ctx.run == experiment
    model = ctx.model.dense_config(vocab_size=ctx.data.tokenizer.vocab_size)
    assert model.max_seq_len == ctx.train.seq_len
    assert set(ctx.data.resolved) == {ctx.data.general, *ctx.data.domains, *ctx.data.ood}
    for name in (*ctx.pipeline.mix_variants, ctx.budget.moe.reference):
        assert ctx.variant(name).layout(model, len(ctx.data.domains)).ffn_experts >= 1


def test_paper_experiment_is_table_8_and_section_6():
    ctx = context("experiment=paper_590m")
    model = ctx.model.dense_config(vocab_size=ctx.data.tokenizer.vocab_size)
    assert model == PRESETS["bam-590m"].replace(max_seq_len=ctx.train.seq_len)
    t = ctx.train
    assert t.lr == pytest.approx(1.2e-4) and t.warmup_steps_max == 1500
    assert t.branch_lr_scale == 0.5 and t.min_lr_ratio == 0.1 and t.weight_decay == 0.1
    assert {ctx.data.resolved[s].type for s in (ctx.data.general, *ctx.data.domains)} == {"hub"}
    assert ctx.tokens_per_step == t.step_tokens == 2**20  # 1M-token batches (Table 1), on any number of GPUs
    assert ctx.world_size == 1 and ctx.batch_split.accumulate == 64  # 8 x 2048 tokens a micro-batch, accumulated
    assert t.split(32).accumulate == 2 and t.split(64).accumulate == 1  # the paper's 32 GPUs, and 64


@pytest.mark.parametrize("logger", group_options("logger"))
def test_every_logger_instantiates_offline(logger, tmp_path, monkeypatch):
    from bam_pipeline.training.loggers import close_logger, make_logger

    monkeypatch.setenv("BAM_STAGES_DIR", str(tmp_path))
    cfg = _compose(f"logger={logger}", "experiment=smoke")
    built = make_logger(plain(cfg.logger), run="smoke", stage="seed", name="main", config={"a": 1})
    assert (built is None) == (logger == "none")
    if logger == "wandb":
        assert built._offline is True
    close_logger(built)


def test_wandb_offline_false_goes_online(tmp_path, monkeypatch):
    """Nothing forces wandb offline behind the user's back: the logger and the report both ask wandb
    for an online run, and the CLI leaves WANDB_MODE alone."""
    import wandb

    from bam_pipeline.training.loggers import log_report, make_logger

    monkeypatch.setenv("BAM_STAGES_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger_cfg = plain(_compose("experiment=smoke", "logger.offline=false").logger)
    logger = make_logger(logger_cfg, run="smoke", stage="seed", name="main", config={})
    assert logger._offline is False
    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before any network")

    monkeypatch.setattr(wandb, "init", fake_init)
    with pytest.raises(RuntimeError, match="stop before"):
        log_report(logger_cfg, run="smoke", files=[], metrics_rows=[])
    assert seen["mode"] == "online"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    code = "import os, bam_pipeline.cli; print(os.environ.get('WANDB_MODE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


@pytest.mark.parametrize("trainer", group_options("trainer"))
def test_every_trainer_config_builds_a_lightning_trainer(trainer, tmp_path):
    spec = context(f"trainer={trainer}").trainer
    kwargs = trainer_kwargs(spec)
    accepted = set(inspect.signature(L.Trainer.__init__).parameters)
    assert set(kwargs) <= accepted, set(kwargs) - accepted
    if spec.strategy == "fsdp2":  # never silently tensor-parallel: both mesh sizes are given
        assert (kwargs["strategy"]._data_parallel_size, kwargs["strategy"]._tensor_parallel_size) == (spec.world_size, 1)
    if spec.accelerator != "cpu":
        return  # a GPU trainer cannot be built on this machine; its arguments are checked above
    built = L.Trainer(**kwargs, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    assert built.world_size == world_size(spec.flags()) == spec.devices * spec.num_nodes
    names = {"auto": "SingleDeviceStrategy", "ddp": "DDPStrategy", "fsdp": "CPUFSDPStrategy",
             "fsdp2": "ModelParallelStrategy"}
    assert type(built.strategy).__name__ == names[spec.strategy]


def test_slurm_launcher_writes_an_sbatch_script_for_the_trainer(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit

    monkeypatch.setenv("BAM_STAGES_DIR", str(tmp_path))
    fake_bin = tmp_path / "bin"  # submitit only builds a SLURM executor where `srun` exists
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = _compose("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2",
                   hydra_cfg=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    executors = []
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda self, *a: executors.append(self) or [])
    assert launcher.launch([["stage=branch", "domain=code"]], initial_job_idx=0) == []
    sbatch = executors[0]._executor._make_submission_file_text("python -m bam_pipeline", "uid")
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=2",
                 "#SBATCH --time=1440", "#SBATCH --signal=USR1@90", "#SBATCH --requeue"):
        assert line in sbatch, sbatch
    assert "USR2" not in sbatch  # submitit's own timeout signal (and requeue) is off
    assert executors[0]._executor.max_num_timeout == 0


def test_a_training_seed_is_its_own_run_beside_this_one_reading_this_runs_data(monkeypatch, tmp_path):
    monkeypatch.setenv("BAM_STAGES_DIR", str(tmp_path))
    ctx = context("experiment=tiny", "pipeline.seeds=[0,2]", "train.lr=1e-3")
    assert ctx.seeds == (0, 2) and ctx.for_seed(0) is ctx  # train.seed's run is this run itself
    other = ctx.for_seed(2)
    assert other.layout.run_dir == tmp_path / "tiny-seed2" and other.train.seed == 2 and other.train.lr == 1e-3
    assert other.layout.data == (tmp_path / "tiny" / "data").resolve() and other.layout.shares_data
    assert other.layout.lock("data") == ctx.layout.lock("data").resolve()  # one lock for the one data directory
    assert other.pipeline.seeds is None and other.config_hash != ctx.config_hash
    assert other.logger is None or str(tmp_path / "tiny-seed2") in str(other.logger.get("save_dir", "tiny-seed2"))
    assert other.cmd("stage=eval").endswith("run=tiny-seed2 train.seed=2")
    assert "train.lr=1e-3" in other.cmd("stage=eval")
