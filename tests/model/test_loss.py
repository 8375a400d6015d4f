"""The chunked LM loss equals the plain one (loss and every gradient), and chunking starts above its size."""

import pytest
import torch

from bam_pipeline.errors import ConfigError
from bam_pipeline.model import BAMTransformer, preset
from bam_pipeline.model.loss import IGNORE_INDEX, LossChunking, chunked_next_token_nll, next_token_nll

ALWAYS = LossChunking(above=0, chunk_logits=5 * 256)  # 5 tokens per chunk at V=256: chunks of 5, ..., 5, 4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _grads(model: BAMTransformer, idx, targets, chunking, reduction="mean"):
    model.zero_grad(set_to_none=True)
    loss, out = model.loss(idx, targets, chunking=chunking, reduction=reduction)
    (loss + out.aux_loss).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied,scale,mix", [(False, 1.0, False), (True, 1.0, True), (True, 0.25, False),
                                            (False, 0.0625, True)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_and_every_gradient_equal_the_plain_loss(tied, scale, mix, reduction):
    torch.manual_seed(0)
    cfg = preset("smoke", tie_embeddings=tied, logit_scale=scale)
    if mix:
        cfg = cfg.replace(attn_experts=2, ffn_experts=2)
    model = BAMTransformer(cfg)
    idx = torch.randint(0, 256, (3, 13))
    targets = torch.randint(0, 256, (3, 13))
    targets[0, :4] = IGNORE_INDEX
    targets[2, -1] = IGNORE_INDEX
    plain, plain_grads = _grads(model, idx, targets, None, reduction)
    chunked, chunked_grads = _grads(model, idx, targets, ALWAYS, reduction)
    assert abs(chunked.item() - plain.item()) <= 1e-6 * abs(plain.item())
    assert plain_grads.keys() == chunked_grads.keys() == {n for n, _ in model.named_parameters()}
    for name, g in plain_grads.items():
        assert _rel(chunked_grads[name], g) <= 1e-5, name
    if tied:  # the embedding's gradient has both parts: the lookup and the output projection
        assert "tok_emb.weight" in chunked_grads and "lm_head.weight" not in chunked_grads


def test_chunked_loss_gives_the_hidden_states_their_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 7))
    targets[1, 2] = IGNORE_INDEX
    want = next_token_nll(torch.nn.functional.linear(hidden, weight) * 0.5, targets)
    (gh, gw) = torch.autograd.grad(want * 3.0, (hidden, weight))
    got = chunked_next_token_nll(hidden, weight, targets, chunk=3, logit_scale=0.5)
    (ch, cw) = torch.autograd.grad(got * 3.0, (hidden, weight))  # an upstream gradient other than 1
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    assert _rel(ch, gh) <= 1e-5 and _rel(cw, gw) <= 1e-5
    assert ch[1, 2].abs().max() == 0  # an ignored position gets no gradient


def test_chunked_loss_under_autocast_and_without_gradients():
    torch.manual_seed(0)
    model = BAMTransformer(preset("smoke"))
    idx = torch.randint(0, 256, (2, 16))
    with torch.inference_mode():
        plain, _ = model.loss(idx, idx, reduction="sum")
        chunked, out = model.loss(idx, idx, reduction="sum", chunking=ALWAYS)
    assert out.logits is None and abs(chunked.item() - plain.item()) <= 1e-6 * plain.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = model.loss(idx, idx)
        chunked, _ = model.loss(idx, idx, chunking=ALWAYS)
    assert chunked.dtype == torch.float32 and abs(chunked.item() - plain.item()) <= 1e-2 * plain.item()
    chunked.backward()
    assert model.tok_emb.weight.grad.dtype == torch.float32


def test_chunking_starts_above_its_size():
    rule = LossChunking(above=1000, chunk_logits=300)
    assert rule.chunk_tokens(vocab_size=100, n_tokens=10) is None  # 1000 logits: not above
    assert rule.chunk_tokens(vocab_size=100, n_tokens=11) == 3
    assert rule.chunk_tokens(vocab_size=1000, n_tokens=2) == 1  # at least one token per chunk
    with pytest.raises(ConfigError, match="chunk_logits=0"):
        LossChunking(above=0, chunk_logits=0)


def test_chunked_per_token_loss_equals_the_plain_one_and_refuses_gradients():
    """Eval's per-token and per-document losses (reduction='none') through the chunked loss."""
    torch.manual_seed(0)
    model = BAMTransformer(preset("smoke"))
    idx = torch.randint(0, 256, (2, 16))
    targets = idx.clone()
    targets[0, :3] = IGNORE_INDEX
    with torch.inference_mode():
        plain, _ = model.loss(idx, targets, reduction="none")
        chunked, out = model.loss(idx, targets, reduction="none", chunking=ALWAYS)
    assert out.logits is None and chunked.shape == targets.shape == plain.view(targets.shape).shape
    torch.testing.assert_close(chunked, plain.view(targets.shape), rtol=1e-6, atol=1e-6)
    assert (chunked[0, :3] == 0).all()
    with pytest.raises(ValueError, match="without gradients"):
        model.loss(idx, targets, reduction="none", chunking=ALWAYS)


def test_eval_scores_alike_with_and_without_the_chunked_loss():
    from bam_pipeline.eval.metrics import sequence_nll

    torch.manual_seed(0)
    model = BAMTransformer(preset("smoke")).eval()
    seqs = torch.randint(0, 256, (5, 17))
    docs = torch.tensor([0, 0, 1, 1, 2])[:, None].expand(5, 17)
    kw = dict(batch_size=2, device=torch.device("cpu"), documents=docs, n_docs=3)
    plain = sequence_nll(model, seqs, **kw)
    chunked = sequence_nll(model, seqs, chunking=ALWAYS, **kw)
    assert chunked.tokens == plain.tokens and abs(chunked.nll - plain.nll) <= 1e-6 * plain.nll
    assert abs(chunked.doc_nll - plain.doc_nll).max() <= 1e-5
