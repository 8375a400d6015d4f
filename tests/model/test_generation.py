"""Decoding with the KV cache: cached greedy decoding equals a cache-free argmax loop token for token,
incremental logits equal full-forward logits, padded batches decode as their prompts alone, sampling
is seeded, and shared KV caches one K/V set per layer (measured from the cache tensors)."""

from __future__ import annotations

import pytest
import torch

from bam_pipeline.errors import BamError
from bam_pipeline.model import BAMTransformer, ModelConfig, RouterConfig, preset
from bam_pipeline.model.config import RopeScaling
from bam_pipeline.model.generation import (
    GREEDY, Sampling, cache_bytes_per_token, generate, greedy_without_cache, left_pad, top_p_filter,
)
from bam_pipeline.model.kv_cache import KVCache

SMOKE = preset("smoke", max_seq_len=96)  # d_model 32, 4 heads / 2 KV heads, 2 layers
TOP1, TOP2 = RouterConfig("topk", 1), RouterConfig("topk", 2)
BAM = dict(attn_experts=4, ffn_experts=4)
CONFIGS: dict[str, ModelConfig] = {
    "dense": SMOKE,
    "bam_expert_kv": SMOKE.replace(**BAM),
    "bam_shared_kv": SMOKE.replace(**BAM, attn_kv="shared"),
    "bam_attn_top1": SMOKE.replace(**BAM, attn_router=TOP1),
    "bam_attn_top2_shared_kv": SMOKE.replace(**BAM, attn_kv="shared", attn_router=TOP2),
    "btx": SMOKE.replace(ffn_experts=4),
    "btx_top2_renormalised": SMOKE.replace(ffn_experts=4, ffn_router=RouterConfig("topk", 2, renormalize=True)),
    "sequential_llama_like": SMOKE.replace(parallel_residual=False, n_kv_heads=1, tie_embeddings=True),
    "imported_style": SMOKE.replace(
        qkv_bias=True, norm_kind="layernorm", logit_scale=0.5, head_dim_override=12, rope_theta=500.0,
        rope_scaling=RopeScaling("linear", factor=2.0), rope_precision="float32",
    ),
    "imported_style_bam_shared_kv": SMOKE.replace(
        **BAM, attn_kv="shared", qkv_bias=True, norm_kind="layernorm", logit_scale=2.0,
        parallel_residual=False,
    ),
}
PROMPTS = [[5, 17, 3, 99, 42, 7, 7, 200], [11, 12], [250, 1, 2, 3, 4]]
NEW_TOKENS = 40
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_model(cfg: ModelConfig, seed: int = 0) -> BAMTransformer:
    """A random model with peaked attention and routing, non-trivial norms and biases, so that a
    position, head or routing bug changes the argmax instead of hiding in near-uniform noise."""
    torch.manual_seed(seed)
    model = BAMTransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.wq", "attn.wk")):
                p.mul_(2.0)
            elif name.endswith("router.weight"):
                p.mul_(10.0)
            elif name.endswith(("attn.bq", "attn.bk", "attn.bv")):
                p.normal_(0.0, 0.3)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request) -> BAMTransformer:
    return random_model(CONFIGS[request.param])


def test_cached_greedy_equals_the_cache_free_argmax_loop(model):
    got = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS)
    want = [greedy_without_cache(model, p, NEW_TOKENS) for p in PROMPTS]
    assert got.tokens == want
    assert all(len(t) == NEW_TOKENS for t in got.tokens) and not any(got.stopped_at_eos)
    assert len({tuple(t) for t in want}) > 1  # the prompts lead somewhere different


def test_incremental_logits_equal_the_full_forward(model):
    ids = torch.randint(0, model.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits  # (2, 48, V)
        cache = KVCache.for_model(model, 2, 48)
        chunks = [model(ids[:, :20], cache=cache).logits, model(ids[:, 20:23], cache=cache).logits]
        chunks += [model(ids[:, t: t + 1], cache=cache).logits for t in range(23, 48)]
    assert full.std() > 0.05
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert (model(ids, last_only=True).logits - full[:, -1:]).abs().max().item() <= 1e-5


def test_a_left_padded_row_computes_what_its_prompt_computes_alone(model):
    ids, valid = left_pad(PROMPTS)
    with torch.no_grad():
        batched = model(ids, cache=KVCache.for_model(model, len(PROMPTS), ids.shape[1]), valid=valid).logits
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt])).logits[0]  # (T_row, V)
            assert (batched[row, -len(prompt):] - alone).abs().max().item() <= 1e-5
            assert torch.isfinite(batched[row]).all()  # padding rows attend to themselves: no NaN


def test_a_sequence_stops_at_eos_and_keeps_it():
    model = random_model(CONFIGS["bam_expert_kv"])
    free = [greedy_without_cache(model, p, NEW_TOKENS) for p in PROMPTS]
    eos = free[0][5]
    got = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=eos)
    for tokens, stopped, reference in zip(got.tokens, got.stopped_at_eos, free):
        cut = reference.index(eos) + 1 if eos in reference else len(reference)
        assert tokens == reference[:cut] and stopped == (eos in reference)
    assert got.stopped_at_eos[0] and got.tokens[0][-1] == eos
    assert greedy_without_cache(model, PROMPTS[0], NEW_TOKENS, eos_id=eos) == got.tokens[0]


def test_sampling_is_seeded_and_its_limits_are_greedy():
    model = random_model(CONFIGS["bam_shared_kv"])
    hot = Sampling(temperature=1.5, top_p=0.9)

    def sample(seed: int, sampling: Sampling) -> list[list[int]]:
        return generate(model, PROMPTS, max_new_tokens=24, sampling=sampling,
                        generator=torch.Generator().manual_seed(seed)).tokens

    assert sample(1, hot) == sample(1, hot)
    assert sample(1, hot) != sample(2, hot)
    greedy = generate(model, PROMPTS, max_new_tokens=24, sampling=GREEDY).tokens
    assert sample(3, Sampling(temperature=1.0, top_p=1e-6)) == greedy  # the nucleus is the argmax alone
    assert sample(4, Sampling(temperature=1e-4)) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    for top_p, kept in ((0.5, [1]), (0.6, [1, 3]), (0.9, [1, 2, 3]), (0.95, [0, 1, 2, 3])):
        want = torch.zeros_like(probs)
        want[0, kept] = probs[0, kept]
        assert torch.equal(top_p_filter(probs, top_p), want)


def test_shared_kv_caches_one_set_per_layer_measured_from_the_tensors():
    measured = {name: cache_bytes_per_token(random_model(CONFIGS[name]))
                for name in ("dense", "bam_expert_kv", "bam_shared_kv", "btx")}
    per_set = 2 * SMOKE.n_layers * SMOKE.n_kv_heads * SMOKE.head_dim * 4  # K and V, float32
    assert measured["bam_shared_kv"] == measured["btx"] == measured["dense"] == per_set
    assert measured["bam_expert_kv"] == 4 * measured["bam_shared_kv"]  # one set per attention expert
    generated = generate(random_model(CONFIGS["bam_shared_kv"]), PROMPTS, max_new_tokens=4)
    assert generated.cache_bytes_per_token == per_set
    half = random_model(CONFIGS["bam_expert_kv"]).to(torch.bfloat16)
    assert cache_bytes_per_token(half) == measured["bam_expert_kv"] / 2


def test_bad_requests_are_one_line_errors():
    model = random_model(SMOKE)
    with pytest.raises(BamError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(BamError, match="exceeds the model's context"):
        generate(model, [[1] * 90], max_new_tokens=10)
    with pytest.raises(BamError, match="no prompts"):
        generate(model, [], max_new_tokens=4)
    with pytest.raises(BamError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(BamError, match="pass cache="):
        model(torch.tensor([[1, 2]]), valid=torch.tensor([[True, True]]))
    cache = KVCache.for_model(model, 1, 4)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(BamError, match="capacity of 4"):
        model(torch.tensor([[1, 2]]), cache=cache)


def test_logits_that_are_not_finite_stop_generation():
    """Finite weights whose forward pass overflows (a huge final norm): no token is drawn from NaN logits."""
    model = random_model(SMOKE)
    with torch.no_grad():
        model.norm.weight.fill_(3e38)
    for sampling in (GREEDY, Sampling(temperature=1.0)):
        with pytest.raises(BamError, match="logits are not finite.*train.lr"):
            generate(model, PROMPTS, max_new_tokens=4, sampling=sampling, generator=torch.Generator().manual_seed(0))
