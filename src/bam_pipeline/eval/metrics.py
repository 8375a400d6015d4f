"""Language-model metrics on token sequences: summed next-token NLL, perplexity, bits per byte; and
a model's forward throughput on one batch (:func:`forward_tokens_per_s`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from bam_pipeline.model.loss import LossChunking


@dataclass(frozen=True)
class NllSum:
    """Summed next-token negative log-likelihood (nats) over ``tokens`` predicted tokens."""

    nll: float
    tokens: int
    doc_nll: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (D,) summed NLL per document
    doc_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (D,) predicted tokens per document

    @property
    def mean_loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_loss)


def bits_per_byte(nll_nats: float, text_bytes: float) -> float:
    """Total NLL in bits divided by the UTF-8 bytes of the text it was measured on."""
    return nll_nats / math.log(2) / text_bytes


def evaluated_bytes(split_bytes: int, split_tokens: int, tokens_evaluated: int) -> float:
    """Bytes of text covered by ``tokens_evaluated`` of a split, estimated: its bytes scaled by the token
    fraction (for a tokenizer whose tokens' bytes are not known, :func:`scored_text_bytes`)."""
    return split_bytes * min(1.0, tokens_evaluated / split_tokens)


def scored_text_bytes(seqs: torch.Tensor, byte_lengths: np.ndarray) -> int:
    """The UTF-8 bytes of the text the scored tokens of ``seqs`` (N, T+1) stand for, exactly: each row's targets
    (tokens 1..T) at ``byte_lengths`` (V,) bytes each (``data.tokenizer.token_byte_lengths``: 0 for the end of
    a document)."""
    return int(byte_lengths[seqs[:, 1:].numpy()].sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def token_nll(model: torch.nn.Module, batch: torch.Tensor, *, chunking: LossChunking | None = None
              ) -> tuple[torch.Tensor, object]:
    """Per-token NLL (B, T) float32 of a (B, T+1) batch (each row predicts tokens 1..T), and the output."""
    inp, tgt = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
    nll, out = model.loss(inp, tgt, reduction="none", chunking=chunking)
    return nll.view(tgt.shape), out


@torch.inference_mode()
def sequence_nll(
    model: torch.nn.Module,
    seqs: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    documents: torch.Tensor | None = None,
    n_docs: int = 0,
    on_routing: Callable[[list], None] | None = None,
    chunking: LossChunking | None = None,
) -> NllSum:
    """Summed NLL of ``seqs`` (N, T+1): each row predicts its tokens 1..T from the ones before; with
    ``documents`` (N, T+1), also per document (``n_docs`` of them).

    The loss is the model's own next-token NLL (float32; chunked as ``chunking`` says), summed in
    float64. ``on_routing`` receives each batch's ``ModelOutput.routing``. Speed is measured apart
    (:func:`forward_tokens_per_s`).
    """
    doc_nll, doc_tokens = np.zeros(n_docs), np.zeros(n_docs)
    nll, tokens = 0.0, 0
    for start in range(0, seqs.shape[0], batch_size):
        batch = seqs[start : start + batch_size].to(device)  # (B, T+1)
        per_token, out = token_nll(model, batch, chunking=chunking)  # (B, T)
        per_token = per_token.double().cpu()
        nll += float(per_token.sum())
        tokens += per_token.numel()
        if documents is not None:
            docs = documents[start : start + batch_size, 1:].reshape(-1)  # (B*T,) the targets' documents
            doc_nll += torch.bincount(docs, weights=per_token.reshape(-1), minlength=n_docs).numpy()
            doc_tokens += torch.bincount(docs, minlength=n_docs).double().numpy()
        if on_routing is not None:
            on_routing(out.routing)
    return NllSum(nll, tokens, doc_nll, doc_tokens)


@torch.inference_mode()
def forward_tokens_per_s(model: torch.nn.Module, batch: torch.Tensor, *, device: torch.device, repeats: int,
                         chunking: LossChunking | None = None) -> float:
    """Tokens/s of the model's loss on ``batch`` (B, T+1): one untimed pass (one-time set-up), then
    ``repeats`` timed ones (synchronised on CUDA)."""
    batch = batch.to(device)
    inp, tgt = batch[:, :-1], batch[:, 1:]
    model.loss(inp, tgt, reduction="sum", chunking=chunking)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.loss(inp, tgt, reduction="sum", chunking=chunking)
    _sync(device)
    return repeats * tgt.numel() / (time.perf_counter() - t0)
