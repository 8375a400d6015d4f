"""Stage mixtures and their realisation: token shares of the training set within 1% of the target."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omegaconf import OmegaConf

from bam_pipeline.config.files import conf_dir
from bam_pipeline.data.datamodule import MixtureDataModule
from bam_pipeline.data.mixtures import allocate, stage_mixture
from bam_pipeline.data.spec import read_data_spec
from bam_pipeline.errors import BamError

CFG = read_data_spec(OmegaConf.load(conf_dir() / "data" / "default.yaml"))  # general 70% / 10%


def test_stage_mixtures_follow_the_paper():
    assert stage_mixture("seed", CFG) == pytest.approx({"general": 0.7, "code": 0.1, "math": 0.1, "law": 0.1})
    assert stage_mixture("branch", CFG, "math") == pytest.approx({"math": 0.9, "general": 0.1})
    assert stage_mixture("moe", CFG) == pytest.approx({"general": 0.25, "code": 0.25, "math": 0.25, "law": 0.25})


def test_readme_states_the_seed_mixture_the_config_trains():
    """The README's description of the seed's data is the shipped config's seed mixture."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    m = re.search(r"\*\*seed\*\*: .*? on (\d+)% general text and (\d+)% domain text\s+\((\d+)% each of ([a-z, ]+)",
                  readme)
    assert m, "README's seed step no longer states its mixture"
    seed = stage_mixture("seed", CFG)
    assert int(m[1]) / 100 == pytest.approx(seed["general"])
    assert int(m[2]) / 100 == pytest.approx(1 - seed["general"])
    assert re.split(r", | and ", m[4].strip()) == list(CFG.domains)
    assert all(seed[d] == pytest.approx(int(m[3]) / 100) for d in CFG.domains)


def test_unknown_branch_domain_lists_the_known_ones():
    with pytest.raises(BamError, match="unknown branch domain 'biology'; known domains: code, math, law"):
        stage_mixture("branch", CFG, "biology")
    with pytest.raises(BamError, match="unknown data stage 'mix'"):
        stage_mixture("mix", CFG)


def test_allocate_is_exact_and_within_one():
    props = {"a": 0.7, "b": 0.1, "c": 0.1, "d": 0.1}
    for total in (1, 7, 999, 10_001):
        got = allocate(props, total)
        assert sum(got.values()) == total
        assert all(abs(got[k] - p * total) < 1 for k, p in props.items())


def _source_of_token(prepared, alphabets: dict[str, str]) -> np.ndarray:
    """token id -> index of the source whose alphabet it is made of (-1: end-of-document)."""
    tok = prepared.tokenizer()
    names = list(alphabets)
    out = np.full(prepared.vocab_size, -1)
    for tid in range(prepared.vocab_size):
        s = tok.id_to_token(tid)
        owners = {i for i, n in enumerate(names) if s and set(s) <= set(alphabets[n])}
        if owners:
            out[tid] = owners.pop()
    return out


@pytest.mark.parametrize("stage,domain", [("seed", None), ("branch", "law"), ("moe", None)])
def test_training_set_token_shares_within_one_percent(synthetic, alphabets, stage, domain):
    cfg, prepared = synthetic
    props = stage_mixture(stage, read_data_spec(cfg), domain)
    seq_len, train_tokens = 63, 20_000
    dm = MixtureDataModule(prepared, props, seq_len=seq_len, batch_size=8, train_tokens=train_tokens, val_tokens=2_000, seed=3)
    ds = dm.train_dataset()
    assert len(ds) == math.ceil(train_tokens / seq_len)
    rows = np.stack([ds[i].numpy() for i in range(len(ds))])
    assert rows.shape == (len(ds), seq_len + 1)
    owner = _source_of_token(prepared, alphabets)[rows.reshape(-1)]
    eos = rows.reshape(-1) == prepared.eos_id
    assert (owner[~eos] >= 0).all()
    counted = {n: int((owner == i).sum()) for i, n in enumerate(alphabets)}
    total = sum(counted.values())
    for name in alphabets:
        assert abs(counted[name] / total - props.get(name, 0.0)) < 0.01, (name, counted)


def test_small_source_is_repeated_and_recorded(synthetic, capsys):
    cfg, prepared = synthetic
    have = len(prepared.stream("law", "train"))
    dm = MixtureDataModule(
        prepared, {"law": 1.0}, seq_len=31, batch_size=4, train_tokens=3 * have, val_tokens=0, seed=0
    )
    assert dm.repeats["law"] == pytest.approx(dm.train_token_counts["law"] / have)
    assert dm.repeats["law"] > 3
    assert "source 'law' repeated" in capsys.readouterr().out
