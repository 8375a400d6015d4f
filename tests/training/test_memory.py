"""The memory planner: two configurations computed by hand, its activation count against the tensors
autograd saves, every preset x mix variant, and device sizes."""

import pytest
import torch

from bam_pipeline.config.files import group_options, load_option
from bam_pipeline.config.reading import read_section
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model import BAMTransformer, RouterConfig, preset
from bam_pipeline.model.config import PRESETS
from bam_pipeline.model.counting import count_params
from bam_pipeline.model.loss import LossChunking
from bam_pipeline.training.memory import (MemorySetup, activation_bytes, autocast_weight_bytes, estimate,
                                          parse_bytes)


def test_smoke_dense_on_one_device_in_float32_by_hand():
    # V=256, D=32, L=2, H=4, KV=2, hd=8, F=64, untied. Parameters: embedding + head 2*256*32 = 16384,
    # final norm 32, per layer norm 32 + wq 1024 + wk 512 + wv 512 + wo 1024 + w1, w3, w2 3*2048 = 9248.
    cfg = preset("smoke")
    assert count_params(cfg).total == 16384 + 32 + 2 * 9248 == 34912
    m = estimate(cfg, MemorySetup(2, 16, 1, "auto", "32-true", False, None))
    assert (m.params, m.grads, m.optimizer) == (4 * 34912, 4 * 34912, 8 * 34912)
    # per token and layer (4 bytes each): norm input + output 8D + 4 (rsqrt), h 4D = 388; q and o 2*4*32 = 256;
    # k and v 2*4*16 = 128; log-sum-exp 4*4 = 16; SwiGLU 4*4*64 = 1024: 1812. Fused wq, wk copies 4*(1024+512).
    blocks = 2 * (32 * 1812 + 4 * 1536)
    final_norm, idx, log_softmax = 32 * 388, 8 * 32, 4 * 32 * 256
    assert m.activations == blocks + final_norm + idx + log_softmax == 173696
    assert m.working == 32 * 256 * 8  # the plain loss's logits and one gradient, float32
    assert m.total == 797824


def test_bam_590m_under_fsdp_on_8_gpus_by_hand():
    # BAM (expert KV, 4 experts of each kind) over bam-590m: 776,002,560 parameters, a block 41,952,256
    # (norm 1024, attention 4 x 4 x 1024^2, its router 4096, FFN 4 x 3 x 1024 x 2048, its router 4096).
    cfg = PRESETS["bam-590m"].replace(attn_experts=4, ffn_experts=4)
    setup = MemorySetup(8, 2048, 8, "fsdp", "bf16-mixed", True, 262)
    m = estimate(cfg, setup)
    share = 776_002_560 // 8
    assert (m.params, m.grads, m.optimizer) == (4 * share, 4 * share, 8 * share)
    # activations (bf16 compute, bf16 residual under FSDP's bf16 parameters), n = 16384 tokens:
    # checkpointed block inputs 6 * n * 1024 * 2; one block recomputed: per token 80124 bytes (norm 10244,
    # q/o 16384, k/v 16384, lse 128, attention router part 12328, permuted rows 4096, SwiGLU 16384, FFN
    # router part 4176) plus its fused Q, K, V copies 3 * 2 * 1024 * 4096; final norm n * 10244; ids 8n;
    # chunked loss: the hidden states' gradient 2 * n * 1024 and the output weight's 4 * 256000 * 1024.
    n = 16384
    blocks = 6 * n * 1024 * 2 + n * 80124 + 3 * 2 * 1024 * 4096
    assert m.activations == blocks + n * 10244 + 8 * n + 2 * n * 1024 + 4 * 256000 * 1024 == 2_789_343_232
    # working: one chunk of 262 tokens' logits (bf16, their float32 softmax, its bf16 cast: 8 bytes each);
    # the gathered root unit (2 x 256000 x 1024 + 1024) and two blocks in bf16, and the root and one
    # block's unsharded float32 gradients
    root, block = 524_289_024, 41_952_256
    assert m.working == 262 * 256000 * 8 + 2 * (root + 2 * block) + 4 * (root + block) == 4_017_928_192
    assert m.total == 8_359_276_544 and m.fits(80 * 10**9)


LAYOUTS = {
    "dense": {},
    "sequential": {"parallel_residual": False},
    "bam": {"attn_experts": 4, "ffn_experts": 4},
    "bam_shared_kv": {"attn_experts": 4, "attn_kv": "shared", "ffn_experts": 4},
    "btx_top2": {"ffn_experts": 4, "ffn_router": RouterConfig("topk", 2, True)},
}


def _saved_bytes(model, idx, chunking, autocast):
    """Bytes of the distinct storages kept for the backward of the loss (parameters left out): what
    autograd saves, and the gradients the chunked loss computed in its forward and keeps on its node."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = model.loss(idx, idx, chunking=chunking)
    nodes, visited, kept = [loss.grad_fn], set(), 0
    while nodes:
        node = nodes.pop()
        if node in visited:
            continue
        visited.add(node)
        kept += sum(t.nbytes for t in getattr(node, "grads", ()) if t is not None)
        nodes += [n for n, _ in node.next_functions if n is not None]
    return sum(seen.values()) + kept


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_activation_count_matches_what_autograd_saves(layout):
    cfg = preset("smoke").replace(d_model=64, d_ff=96, vocab_size=320, n_layers=3, **LAYOUTS[layout])
    model = BAMTransformer(cfg)
    idx = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(0))
    for chunk in (None, 16):
        chunking = None if chunk is None else LossChunking(0, 320 * chunk)
        planned = activation_bytes(cfg, MemorySetup(2, 64, 1, "auto", "32-true", False, chunk))
        assert abs(planned / _saved_bytes(model, idx, chunking, False) - 1) < 0.03
        # under autocast the saved tensors include autocast's bfloat16 weight copies (working memory)
        mixed = MemorySetup(2, 64, 1, "auto", "bf16-mixed", False, chunk)
        planned = activation_bytes(cfg, mixed) + autocast_weight_bytes(cfg)
        assert abs(planned / _saved_bytes(model, idx, chunking, True) - 1) < 0.03


@pytest.mark.parametrize("strategy,world", [("auto", 1), ("ddp", 8), ("fsdp", 8), ("fsdp2", 64)])
def test_every_preset_and_mix_variant_has_a_plan(strategy, world):
    variants = [read_section(MixVariant, load_option("mix", v), f"mix/{v}", name=v) for v in group_options("mix")]
    for dense in PRESETS.values():
        for cfg in [dense, *(v.layout(dense, 3) for v in variants)]:
            m = estimate(cfg, MemorySetup(2, dense.max_seq_len, world, strategy, "bf16-mixed", False, 256))
            assert min(m.params, m.grads, m.optimizer, m.activations, m.working) > 0
            if strategy.startswith("fsdp"):
                assert m.params == 4 * -(-count_params(cfg).total // world)


def test_sizes():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("1.5TB") == 1.5e12


@pytest.mark.parametrize("layout", ["bam", "bam_shared_kv", "btx_top2", "bias"])
def test_frozen_experts_plan_the_gradients_and_optimizer_state_one_step_holds(layout):
    """bam_frozen: the planner's gradient and AdamW bytes against the tensors one step leaves, with the
    experts frozen the way the moe stage freezes them (and, for contrast, not frozen)."""
    from bam_pipeline.training.module import freeze_expert_tensors

    extra = {"attn_experts": 4, "ffn_experts": 4, "qkv_bias": True} if layout == "bias" else LAYOUTS[layout]
    cfg = preset("smoke").replace(**extra)
    setup = MemorySetup(2, 16, 1, "auto", "32-true", False, None)
    for frozen in (False, True):
        model = BAMTransformer(cfg)
        names = set(freeze_expert_tensors(model)) if frozen else set()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        loss, out = model.loss(idx, idx)
        (loss + out.aux_loss).backward()
        opt.step()
        grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        moments = sum(t.nbytes for state in opt.state.values() for k, t in state.items() if k != "step")
        planned = estimate(cfg, setup, frozen_experts=frozen)
        assert planned.params == sum(p.nbytes for p in model.parameters())
        assert (planned.grads, planned.optimizer) == (grads, moments)
        if frozen:  # the planner's expert count is what the moe stage freezes
            frozen_bytes = sum(p.nbytes for n, p in model.named_parameters() if n in names)
            assert frozen_bytes == 4 * cfg.n_layers * count_params(cfg).per_layer.experts > 0
            assert planned.grads == planned.params - frozen_bytes
