"""The serving cost's machinery (bam_pipeline.eval.serving): decode latency measured for two smoke-size models, the
KV cache bytes read from the cache tensors, torch's threads restored, and the record metrics.json keeps."""

import math

import pytest
import torch

from bam_pipeline.errors import BamError
from bam_pipeline.eval.paper import SECTION73_SECONDS, TABLE7_FLOPS
from bam_pipeline.eval.serving import (NEW_TOKENS, DecodeCost, ServingCosts, ServingRow, decode_prompt, latency_line,
                                       measure_decode, thread_counts, torch_threads)
from bam_pipeline.model import BAMTransformer, RouterConfig, preset
from bam_pipeline.model.counting import flops_per_token
from bam_pipeline.model.kv_cache import KVCache


def test_latency_is_measured_for_two_models_and_the_cache_bytes_are_the_cache_tensors():
    torch.manual_seed(0)
    dense = BAMTransformer(preset("smoke")).eval()
    bam = BAMTransformer(preset("smoke").replace(attn_experts=4, ffn_experts=4)).eval()
    loads = {"dense": 0, "bam": 0}

    def loader(label, model):
        def load():
            loads[label] += 1
            return model
        return load

    before = torch.get_num_threads()
    threads = (1,)  # torch's own count too in the report's test; more threads than free cores make a test slow
    measured = measure_decode({"dense": loader("dense", dense), "bam": loader("bam", bam)}, rounds=2, threads=threads)
    assert torch.get_num_threads() == before
    assert loads == {"dense": 2, "bam": 2}  # loaded once per round
    assert thread_counts() == tuple(sorted({1, before}))  # one thread and torch's
    for label, model in (("dense", dense), ("bam", bam)):
        cost = measured[label]
        for t in threads:
            assert len(cost.seconds_per_token[t]) == 2
            assert all(0 < s < math.inf for s in cost.seconds_per_token[t])
            assert cost.latency(t) > 0
        capacity = model.cfg.max_seq_len
        cache = KVCache.for_model(model, 1, capacity)
        assert cost.cache_bytes_per_token == sum(t.nbytes for t in (*cache.keys, *cache.values)) / capacity
    assert measured["bam"].cache_bytes_per_token == 4 * measured["dense"].cache_bytes_per_token  # expert KV: 4 sets


def test_without_rounds_only_the_cache_bytes_are_read():
    model = BAMTransformer(preset("smoke")).eval()
    cost = measure_decode({"m": lambda: model}, rounds=0, threads=(1,))["m"]
    assert cost.seconds_per_token == {1: []} and cost.latency(1) is None and cost.cache_bytes_per_token > 0
    assert latency_line(cost, rounds=0, prompt_tokens=48, machine="cpu") == \
        "decode latency: not timed (eval.latency_rounds=0)"


def test_threads_are_fixed_inside_and_restored_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError
    assert torch.get_num_threads() == before


def test_the_prompt_leaves_room_for_the_new_tokens():
    prompt = decode_prompt(64, 256)
    assert len(prompt) == 64 - NEW_TOKENS and all(0 <= t < 256 for t in prompt)
    assert decode_prompt(64, 256) == prompt  # the same prompt for every model of a vocabulary
    with pytest.raises(BamError, match="max_seq_len=16"):
        decode_prompt(NEW_TOKENS, 256)


def test_the_record_reads_back_and_gives_ratios_of_the_models_it_has():
    def row(label, flops, kv, seconds):
        return ServingRow(label, label, 10, 5, 2.0 * flops, flops, 48, DecodeCost(kv, {1: seconds, 2: seconds}))

    costs = ServingCosts([row("moe/bam", 4.0, 400.0, [0.3, 0.1, 0.2]), row("moe/btx", 2.0, 100.0, [0.1])],
                         "cpu model", "cpu", (1, 2), 3)
    again = ServingCosts.from_dict(costs.to_dict())
    assert again == costs
    assert again.by_label["moe/bam"].cost.latency(2) == 0.2  # the median round
    assert costs.ratio("moe/bam", "moe/btx", lambda r: r.flops_per_token_without_head) == 2.0
    assert costs.ratio("moe/bam", "moe/btx", lambda r: r.cost.latency(1)) == pytest.approx(2.0)
    assert costs.ratio("moe/bam_kv_shared", "moe/btx", lambda r: r.cost.cache_bytes_per_token) is None


def test_the_papers_table_7_is_our_count_of_one_block_at_its_convention():
    """docs/paper.md section 10: Table 7's FLOPs are those of one block, counting attention over T/2 positions
    (ours: (T+1)/2) and 3 * d_ff more per active FFN expert (SwiGLU's elementwise work, which ours leaves out):
    each of the three figures comes out exactly."""
    cfg, t = preset("bam-590m"), 256
    models = {"moe/bam": cfg.replace(attn_experts=4, ffn_experts=4), "moe/btx": cfg.replace(ffn_experts=4),
              "moe/btx_matched": cfg.replace(ffn_experts=6, ffn_router=RouterConfig("topk", 3))}
    ours = {"moe/bam": 289_554_432, "moe/btx": 129_036_288, "moe/btx_matched": 280_055_808}
    for label, c in models.items():
        f = flops_per_token(c, t)
        paper_scores = f.attention_scores * (t / 2) / ((t + 1) / 2)
        per_block = (f.attention_proj + paper_scores + f.routers + f.ffn) / c.n_layers + 3 * c.d_ff * c.ffn_active_experts
        assert per_block == TABLE7_FLOPS[label], label
        assert f.non_embedding == ours[label]  # the whole model's 6 blocks (docs/paper.md section 10)
        assert f"{f.non_embedding / TABLE7_FLOPS[label]:.2f}" == "6.00"


def test_the_papers_ratios_are_the_ones_it_states():
    assert f"{TABLE7_FLOPS['moe/bam'] / TABLE7_FLOPS['moe/btx']:.2f}" == "2.24"
    assert f"{SECTION73_SECONDS['moe/bam'] / SECTION73_SECONDS['moe/btx']:.2f}" == "1.28"
    assert f"{SECTION73_SECONDS['moe/bam_kv_shared'] / SECTION73_SECONDS['moe/btx']:.2f}" == "1.24"
