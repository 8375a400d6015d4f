"""Frozen experts (mix variant bam_frozen): the moe stage's module trains routers and averaged weights
only; every stacked expert tensor with E > 1 stays bit-identical under AdamW with weight decay."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from bam_pipeline.config.files import load_option
from bam_pipeline.config.reading import read_section
from bam_pipeline.errors import BamError
from bam_pipeline.mixing.upcycle import upcycle
from bam_pipeline.mixing.variant import MixVariant
from bam_pipeline.model.config import preset
from bam_pipeline.model.transformer import BAMTransformer
from bam_pipeline.training.module import LMModule, OptimConfig, freeze_expert_tensors

DOMAINS = ("code", "math", "law")
EXPERTS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3")


def mixture(name: str, kv: str | None = None):
    node = dict(load_option("mix", name))
    if kv:
        node["kv"] = kv
    v = read_section(MixVariant, node, "mix", name=name)
    torch.manual_seed(0)
    dense = preset("smoke")
    states = {n: BAMTransformer(dense).state_dict() for n in ("seed", *DOMAINS)}
    return v, *upcycle(v, {n: states[n] for n in v.models(DOMAINS)}, dense, DOMAINS, generator_seed=0)


def batches(n: int = 64) -> list[torch.Tensor]:
    """A learnable stream: each row counts up from a random start (next token = this token + 1)."""
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 256, (n, 1), generator=g)
    return list(((starts + torch.arange(33)) % 256).long())


def train(module: LMModule, steps: int) -> None:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches(), batch_size=8, shuffle=False))


def loss_on(module: LMModule, batch: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        loss = module._lm_loss(batch)[0].item()
    module.train()
    return loss


@pytest.mark.parametrize("kv", ["expert", "shared"])
def test_frozen_moe_training_moves_routers_and_averaged_weights_never_experts(kv):
    v, cfg, state = mixture("bam_frozen", kv)
    assert v.freeze_experts
    optim = OptimConfig(lr=3e-3, total_steps=24, warmup_steps=2, weight_decay=0.1)  # decay would move experts
    module = LMModule(cfg, optim, state, freeze_experts=True)
    probe = torch.stack(batches()[:8])
    before = loss_on(module, probe)
    train(module, 24)
    after = {k: t.detach() for k, t in module.model.state_dict().items()}
    frozen = [k for k in state if k.endswith(EXPERTS) and state[k].shape[0] > 1]
    assert frozen and all(torch.equal(after[k], state[k]) for k in frozen)  # bit-identical
    if kv == "shared":  # K/V averaged into one set (E = 1): not an expert, so it trains
        assert "layers.0.attn.wk" not in frozen and not torch.equal(after["layers.0.attn.wk"], state["layers.0.attn.wk"])
    routers = [k for k in state if k.endswith("router.weight")]
    assert routers and all(not torch.equal(after[k], state[k]) for k in routers)  # routers learned
    for k in ("tok_emb.weight", "lm_head.weight", "norm.weight", "layers.0.norm.weight"):  # averaged weights too
        assert not torch.equal(after[k], state[k]), k
    assert loss_on(module, probe) < before - 0.05  # and the loss fell


def test_frozen_tensors_get_no_gradient_and_no_optimizer_state():
    _, cfg, state = mixture("bam_frozen")
    module = LMModule(cfg, OptimConfig(lr=1e-3, total_steps=10, warmup_steps=1), state, freeze_experts=True)
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert frozen == {k for k in state if k.endswith(EXPERTS)}  # bam: every attention and FFN expert stack
    opt = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for n, p in module.model.named_parameters() if n in frozen)
    assert {id(p) for p in module.model.parameters() if p.requires_grad} == in_optimizer
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert decayed and all(p.requires_grad for g in decayed for p in g["params"])


def test_unfrozen_training_moves_the_experts():
    """The control: the same training without freezing changes the experts (so the test above can fail)."""
    _, cfg, state = mixture("bam")
    module = LMModule(cfg, OptimConfig(lr=3e-3, total_steps=6, warmup_steps=1), state)
    train(module, 6)
    assert not torch.equal(module.model.state_dict()["layers.0.ffn.w1"], state["layers.0.ffn.w1"])


def test_btx_freezes_only_its_ffn_experts_and_a_dense_model_has_nothing_to_freeze():
    _, cfg, state = mixture("btx")
    model = BAMTransformer(cfg)
    assert set(freeze_expert_tensors(model)) == {k for k in state if k.endswith(("ffn.w1", "ffn.w2", "ffn.w3"))}
    with pytest.raises(BamError, match="no expert tensors"):
        LMModule(preset("smoke"), OptimConfig(lr=1e-3, total_steps=1, warmup_steps=0), freeze_experts=True)
