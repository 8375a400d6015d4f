"""Backbone options of imported checkpoints, one test each: explicit head width, q/k/v biases,
LayerNorm, logit scale, RoPE scaling, sliding-window bound; defaults that keep the native presets
as they were; serialisation and validation."""

import dataclasses
import math

import pytest
import torch

from bam_pipeline.errors import ConfigError
from bam_pipeline.model import BAMTransformer, ModelConfig, preset
from bam_pipeline.model.config import OMIT_AT_DEFAULT, PRESETS, RopeScaling, RouterConfig
from bam_pipeline.model.counting import architecture_summary, count_params, flops_per_token
from bam_pipeline.model.layers import LayerNorm, RMSNorm, RotaryEmbedding, rope_inverse_frequencies, rotary_tables
from bam_pipeline.model.state_dict import expected_shapes

BASE = preset("smoke", tie_embeddings=False)  # V=256, D=32, L=2, H=4, KV=2, hd=8, F=64
# ModelConfig's keys before the import options existed: native configs must serialise exactly so
PRE_IMPORT_KEYS = {
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "rope_theta", "norm_eps",
    "tie_embeddings", "parallel_residual", "init_std", "attn_experts", "attn_kv", "attn_router", "ffn_experts",
    "ffn_router", "lb_coef", "z_coef", "name",
}
ALL_OPTIONS = BASE.replace(
    n_heads=2, n_kv_heads=1, head_dim_override=24, qkv_bias=True, norm_kind="layernorm", logit_scale=0.25,
    rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=16),
    rope_precision="float32", sliding_window=128,
)


def _logits(cfg, idx, seed=0, init_std=0.2):
    torch.manual_seed(seed)
    model = BAMTransformer(cfg.replace(init_std=init_std)).eval()
    with torch.no_grad():
        return model(idx).logits


IDX = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(PRESETS))
def test_native_presets_serialise_as_before_and_use_no_option(name):
    cfg = PRESETS[name]
    assert set(cfg.to_dict()) == PRE_IMPORT_KEYS
    model = BAMTransformer(cfg.replace(vocab_size=64, n_layers=1)) if cfg.d_model <= 256 else None
    if model is not None:
        assert type(model.norm) is RMSNorm and model.layers[0].attn.bq is None


def test_rope_tables_are_computed_again_into_emptied_buffers_exactly():
    """A loader that allocates the (never saved) tables empty, as transformers does, gets them back bit for bit."""
    rope = RotaryEmbedding(24, 16, 500.0, ALL_OPTIONS.rope_scaling, torch.float32)
    want = rope.cos.clone(), rope.sin.clone()
    rope.cos.zero_()
    rope.sin.fill_(float("nan"))
    rope.reset_tables()
    assert torch.equal(rope.cos, want[0]) and torch.equal(rope.sin, want[1])


def test_default_rope_tables_are_the_plain_formula():
    hd, theta = 8, 10000.0
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(16, dtype=torch.float64), inv).repeat(1, 2)
    cos, sin = rotary_tables(hd, 16, theta)
    assert torch.equal(cos, angles.cos().float()) and torch.equal(sin, angles.sin().float())


def test_every_option_round_trips_through_to_dict():
    d = ALL_OPTIONS.to_dict()
    assert {f.name for f in dataclasses.fields(ModelConfig) if getattr(ALL_OPTIONS, f.name) != f.default} <= set(d)
    assert d["rope_scaling"] == {"kind": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_seq_len": 16}
    back = ModelConfig.from_dict(d)
    assert back == ALL_OPTIONS and isinstance(back.rope_scaling, RopeScaling)
    assert ModelConfig.from_dict(BASE.to_dict()) == BASE


def test_all_options_together_build_the_counted_layout():
    model = BAMTransformer(ALL_OPTIONS)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(ALL_OPTIONS)
    assert count_params(ALL_OPTIONS).total == sum(p.numel() for p in model.parameters())
    assert model(IDX[:, :8]).logits.shape == (2, 8, 256)
    assert architecture_summary(ALL_OPTIONS) == (
        "parallel blocks, L=2, D=32, H=2/KV=1, F=64, V=256 (untied), hd=24, q/k/v bias, LayerNorm, "
        "RoPE llama3 x8, logit scale 0.25, window 128; dense")
    assert architecture_summary(BASE) == "parallel blocks, L=2, D=32, H=4/KV=2, F=64, V=256 (untied); dense"


def test_head_dim_override_sets_projection_widths():
    cfg = BASE.replace(n_heads=2, n_kv_heads=1, head_dim_override=24)  # 2 * 24 = 48 != D = 32
    assert cfg.head_dim == 24 and BASE.head_dim == 8
    attn = BAMTransformer(cfg).layers[0].attn
    assert attn.wq.shape == (1, 32, 48) and attn.wk.shape == (1, 32, 24) and attn.wo.shape == (1, 48, 32)
    assert attn.rope.cos.shape[-1] == 24
    # D need not divide by H once the width is explicit; an odd width cannot rotate in pairs
    assert BASE.replace(n_heads=3, n_kv_heads=1, head_dim_override=8).head_dim == 8
    with pytest.raises(ConfigError, match="head_dim_override=9"):
        BASE.replace(head_dim_override=9)
    with pytest.raises(ConfigError, match="d_model=30"):
        BASE.replace(d_model=30)


def test_qkv_bias_adds_zero_initialised_biases_that_change_the_output():
    cfg = BASE.replace(qkv_bias=True)
    torch.manual_seed(0)
    model = BAMTransformer(cfg.replace(init_std=0.2)).eval()
    attn = model.layers[0].attn
    assert attn.bq.shape == (1, 32) and attn.bk.shape == (1, 16) and attn.bv.shape == (1, 16)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in (attn.bq, attn.bk, attn.bv))
    with torch.no_grad():
        zero_bias = model(IDX).logits
        torch.testing.assert_close(zero_bias, _logits(BASE, IDX, init_std=0.2), atol=1e-6, rtol=0)
        for name in ("bq", "bk", "bv"):
            b = getattr(attn, name)
            b.normal_(0.0, 1.0)
            moved = (model(IDX).logits - zero_bias).abs().max()
            b.zero_()
            # k's bias too: RoPE rotates it by position, so it is no uniform shift of a query's scores
            assert moved > 1e-3, name
    params = count_params(cfg).per_layer
    assert params.attention_bias == params.attention_bias_active == 32 + 16 + 16
    assert flops_per_token(cfg).total == flops_per_token(BASE).total  # bias additions are not counted


def test_layernorm_centres_then_scales_without_bias():
    norm = LayerNorm(4, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 1.0, 1.0]))
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # mean 3, centred [-2, -1, 0, 3], variance 3.5
    s = math.sqrt(3.5)
    assert norm(x)[0].tolist() == pytest.approx([-2 / s, -2 / s, 0.0, 3 / s])
    assert torch.allclose(norm(x + 5.0), norm(x), atol=1e-6)  # invariant to a shift, unlike RMSNorm
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    model = BAMTransformer(BASE.replace(norm_kind="layernorm", parallel_residual=False))
    norms = [model.norm, model.layers[0].norm, model.layers[0].ffn_norm]
    assert all(type(n) is LayerNorm and n.eps == BASE.norm_eps for n in norms)
    assert (_logits(BASE.replace(norm_kind="layernorm"), IDX) - _logits(BASE, IDX)).abs().max() > 1e-3


def test_logit_scale_multiplies_the_logits():
    torch.testing.assert_close(_logits(BASE.replace(logit_scale=0.0625), IDX), 0.0625 * _logits(BASE, IDX),
                               atol=1e-6, rtol=1e-6)


def test_linear_rope_scaling_divides_positions():
    hd, theta = 8, 10000.0
    cos, sin = rotary_tables(hd, 64, theta, RopeScaling("linear", factor=4.0))
    cos_plain, sin_plain = rotary_tables(hd, 16, theta)
    # position 4p of the scaled rotation is position p of the plain one
    assert torch.allclose(cos[::4], cos_plain, atol=1e-6) and torch.allclose(sin[::4], sin_plain, atol=1e-6)
    assert not torch.allclose(cos[:16], cos_plain, atol=1e-3)


def test_llama3_rope_scaling_keeps_high_divides_low_and_blends_between():
    hd, theta = 32, 10000.0
    scaling = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)
    plain = rope_inverse_frequencies(hd, theta)
    got = rope_inverse_frequencies(hd, theta, scaling)
    wavelen = 2 * math.pi / plain
    high, low = wavelen < 64 / 4, wavelen > 64 / 1
    band = ~high & ~low
    assert high.any() and low.any() and band.any()  # the test sees all three regimes
    assert torch.equal(got[high], plain[high])
    assert torch.allclose(got[low], plain[low] / 8)
    assert ((got[band] < plain[band]) & (got[band] > plain[band] / 8)).all()
    # the blend is continuous: its weight is 0 at the low edge and 1 at the high edge
    smooth = (64 / wavelen[band] - 1) / (4 - 1)
    assert torch.allclose(got[band], (1 - smooth) * plain[band] / 8 + smooth * plain[band])
    assert (_logits(BASE.replace(rope_scaling=RopeScaling("linear", factor=4.0)), IDX)
            - _logits(BASE, IDX)).abs().max() > 1e-3


def test_float32_rope_precision_computes_frequencies_and_angles_in_float32():
    """transformers' RoPE: float32 inverse frequencies, float32 angle products, float32 cos/sin."""
    hd, theta, n = 8, 10000.0, 4096
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    angles = torch.arange(n).float()[:, None] * inv
    cos, sin = rotary_tables(hd, n, theta, precision=torch.float32)
    angles = torch.cat([angles, angles], -1)
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
    cos64, _ = rotary_tables(hd, n, theta)
    assert 0 < (cos - cos64).abs().max() < 1e-3  # float32 angles drift from the float64 ones at long range
    model = BAMTransformer(BASE.replace(rope_precision="float32"))
    assert torch.equal(model.layers[0].attn.rope.cos, rotary_tables(8, 64, BASE.rope_theta, precision=torch.float32)[0])


def test_sliding_window_bounds_the_context():
    assert BASE.replace(max_seq_len=64, sliding_window=64).sliding_window == 64
    with pytest.raises(ConfigError, match="max_seq_len=65.*sliding_window=64"):
        BASE.replace(max_seq_len=65, sliding_window=64)


@pytest.mark.parametrize("changes,key", [
    ({"norm_kind": "batchnorm"}, "norm_kind"),
    ({"rope_precision": "float16"}, "rope_precision"),
    ({"logit_scale": 0.0}, "logit_scale"),
    ({"logit_scale": float("nan")}, "logit_scale"),
    ({"head_dim_override": 0}, "head_dim_override"),
    ({"rope_scaling": {"kind": "dynamic", "factor": 2.0}}, "rope_scaling.kind"),
    ({"rope_scaling": {"kind": "linear", "factor": 0.0}}, "rope_scaling.factor"),
    ({"rope_scaling": {"kind": "none", "factor": 2.0}}, "rope_scaling.factor"),
    ({"rope_scaling": {"kind": "linear", "factor": 2.0, "low_freq_factor": 2.0}}, "rope_scaling.low_freq_factor"),
    ({"rope_scaling": {"kind": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_seq_len": 64}}, "rope_scaling.high_freq_factor"),
    ({"rope_scaling": {"kind": "llama3", "factor": 8.0}}, "rope_scaling.original_max_seq_len"),
])
def test_bad_option_values_name_their_key(changes, key):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**BASE.to_dict(), **changes})
    assert str(err.value).startswith(f"invalid {key}=")


def test_the_first_hashed_fields_are_always_written_and_every_later_one_is_declared_added_later():
    for cls, first in ((ModelConfig, PRE_IMPORT_KEYS), (RouterConfig, {"kind", "k", "renormalize"})):
        later = {f.name for f in dataclasses.fields(cls) if f.metadata.get(OMIT_AT_DEFAULT)}
        assert {f.name for f in dataclasses.fields(cls)} - later == first
