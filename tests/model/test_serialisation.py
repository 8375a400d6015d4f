"""Configs serialise as they did when their hashes were taken: every preset, every shipped mix variant
(``conf/mix/*.yaml`` read into :class:`MixVariant`) and the mixture configs it lays out over every preset,
byte for byte against digests recorded before one serialiser (:func:`~bam_pipeline.model.config.config_dict`)
replaced the hand-kept "drop at default" lists; and a new field declared ``added_later`` leaves every one
unchanged at its default."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from bam_pipeline.config.files import group_options, load_option
from bam_pipeline.config.reading import read_section
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model.config import PRESETS, ModelConfig, RouterConfig, added_later

# "<what> -> the first 16 hex digits of sha256(json.dumps(its to_dict()))", recorded at 6375e6c (before the change)
RECORDED = Path(__file__).with_name("serialised_configs.json")
DOMAIN_COUNTS = (3, 4)


def variants() -> dict[str, MixVariant]:
    return {name: read_section(MixVariant, load_option("mix", name), "mix", name=name) for name in group_options("mix")}


def model_configs() -> dict[str, ModelConfig]:
    """Every preset, and every variant's mixture laid out over every preset for 3 and 4 domains."""
    out = {f"preset {name}": cfg for name, cfg in PRESETS.items()}
    for name, variant in variants().items():
        for base, cfg in PRESETS.items():
            out.update({f"mix {name} on {base}/{n} domains": variant.layout(cfg, n) for n in DOMAIN_COUNTS})
    return out


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def test_every_preset_and_mix_variant_serialises_as_recorded():
    got = {name: digest(cfg.to_dict()) for name, cfg in model_configs().items()}
    got.update({f"mix {name}": digest(variant.to_dict()) for name, variant in variants().items()})
    recorded = json.loads(RECORDED.read_text())
    assert got.keys() == recorded.keys()
    assert [name for name in recorded if got[name] != recorded[name]] == []


def grown(cls: type, default: float = 0.5) -> type:
    """``cls`` with one more field, ``new_option``, declared as a later field would be."""
    return dataclasses.make_dataclass(f"Grown{cls.__name__}", [("new_option", float, added_later(default))],
                                      bases=(cls,), frozen=True)


GrownModelConfig, GrownRouterConfig = grown(ModelConfig), grown(RouterConfig)


def regrow(cfg: ModelConfig, **new) -> ModelConfig:
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for key in ("attn_router", "ffn_router"):
        router = fields[key]
        fields[key] = GrownRouterConfig(**{f.name: getattr(router, f.name) for f in dataclasses.fields(RouterConfig)})
    return GrownModelConfig(**fields, **new)


@pytest.mark.parametrize("name", ["preset smoke", "preset bam-2b", "mix bam_expert_choice on tiny/4 domains",
                                  "mix bam_router_joint on small/3 domains", "mix btx on bam-590m/3 domains"])
def test_a_new_field_changes_nothing_at_its_default_and_is_written_away_from_it(name):
    cfg = model_configs()[name]
    assert json.dumps(regrow(cfg).to_dict()) == json.dumps(cfg.to_dict())
    moved = regrow(cfg, new_option=0.25).to_dict()
    assert list(moved) == [*cfg.to_dict(), "new_option"] and moved["new_option"] == 0.25


def test_a_new_field_changes_no_recorded_serialisation():
    recorded = json.loads(RECORDED.read_text())
    assert {name: digest(regrow(cfg).to_dict()) for name, cfg in model_configs().items()} == {
        name: recorded[name] for name in model_configs()}
