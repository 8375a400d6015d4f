"""Every shipped experiment, trainer, logger and launcher config composes and builds what it names."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from bam_pipeline.conf_files import conf_dir, group_options
from bam_pipeline.model.config import PRESETS
from bam_pipeline.pipeline.stages import dense_model_config, world_size


def _compose(*overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes_into_a_valid_model_and_budget(experiment):
    cfg = _compose(f"experiment={experiment}")
    assert cfg.run == experiment
    model = dense_model_config(cfg, vocab_size=cfg.data.tokenizer.vocab_size)
    assert model.max_seq_len == cfg.train.seq_len
    for stage in ("seed", "branch", "moe"):
        assert cfg.budget[stage].tokens > 0
    assert cfg.budget.moe.match in ("data", "compute")
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_paper_experiment_is_table_8_and_section_6():
    cfg = _compose("experiment=paper_590m")
    model = dense_model_config(cfg, vocab_size=cfg.data.tokenizer.vocab_size)
    assert model == PRESETS["bam-590m"].replace(max_seq_len=cfg.train.seq_len)
    assert cfg.train.lr == pytest.approx(1.2e-4) and cfg.train.warmup_steps_max == 1500
    assert cfg.train.branch_lr_scale == 0.5 and cfg.train.min_lr_ratio == 0.1 and cfg.train.weight_decay == 0.1
    assert all(cfg.data.sources[s].source.type == "hub" for s in ("general", "code", "math", "law"))
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * cfg.train.accumulate * 32  # 32 GPUs
    assert tokens_per_step == 2**20  # 1M-token batches


@pytest.mark.parametrize("logger", group_options("logger"))
def test_every_logger_instantiates_offline(logger, tmp_path, monkeypatch):
    from bam_pipeline.pipeline.loggers import close_logger, make_logger

    monkeypatch.setenv("BAM_STAGES_DIR", str(tmp_path))
    cfg = _compose(f"logger={logger}", "experiment=smoke")
    built = make_logger(OmegaConf.to_container(cfg.logger, resolve=True), run="smoke", stage="seed", name="main",
                        config={"a": 1})
    assert (built is None) == (logger == "none")
    close_logger(built)


@pytest.mark.parametrize("trainer", group_options("trainer"))
def test_every_trainer_config_names_a_world_size(trainer):
    cfg = _compose(f"trainer={trainer}", "trainer.devices=2", "trainer.num_nodes=3")
    assert world_size(cfg.trainer) == 6


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2", hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    with open_dict(cfg):
        assert launcher.gpus_per_node == 8 and launcher.nodes == 2
