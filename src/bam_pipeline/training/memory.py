"""Memory planner: bytes per device of one training configuration, before anyone books a cluster.

Pure functions of a ModelConfig and a :class:`MemorySetup` (batch, sequence, processes, strategy,
precision, activation checkpointing, loss chunking); imports only the model package, so the GPU
benchmark can compare it with ``torch.cuda.max_memory_allocated``. :data:`ASSUMPTIONS` is what it
assumes, printed with every table.

Activations are the tensors this project's model saves for the backward pass, counted from its
code per token and layer (``tests/training/test_memory.py`` checks the count against the tensors
autograd actually saves):
- each block: its norm's float32 input and normalised output, and the normed input ``h`` in the
  compute dtype; attention's q (after RoPE), k, v and output per expert (``E*H*hd``, ``E_kv*KV*hd``)
  and the float32 log-sum-exp per query head; with an attention router its gated output again
  and its float32 logits/probabilities; a dense FFN's four ``(N, F)`` SwiGLU tensors; an MoE FFN's
  permuted input and output rows, the four SwiGLU tensors for each of its ``k`` assignments, and
  the router's float32 logits, probabilities and indices; the fused attention weights (Q, K, and
  V or O where they are re-laid out), which are copies, per layer;
- the final norm, and the loss: the float32 log-softmax of the plain loss, or the chunked loss's
  gradients of the hidden states and of the output weight;
- with activation checkpointing only each block's input is kept, plus one block recomputed at a time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.counting import count_params

SHARDED_STRATEGIES = ("fsdp", "fsdp2")
HALF_PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true")
TRUE_HALF = ("bf16-true", "16-true")
GB = 10**9

ASSUMPTIONS = (
    "AdamW: two moment tensors per parameter in the parameters' dtype (float32 master weights under "
    "32-true and bf16-mixed, bfloat16 under bf16-true); gradients in the same dtype, all held until the "
    "optimizer step",
    "fsdp/fsdp2: parameters, gradients and optimizer state divided over every process; working memory adds "
    "the gathered (unsharded) root unit (embedding, head, final norm) and two blocks in the compute dtype, "
    "and their unsharded float32 gradients before the reduce-scatter",
    "ddp: everything replicated, plus a gradient-sized set of communication buckets; bf16-mixed without "
    "fsdp: autocast's bfloat16 copies of the weights matmuls read, held for the backward pass",
    "activations: what the model saves for the backward pass of one micro-batch (counted per token and "
    "layer from the model's code); the LM loss's peak on top (whole float32 logits, or one chunk of them)",
    "frozen experts (mix variants with freeze_experts): no gradients or optimizer state for the stacked "
    "expert tensors; their activations still count, since the routers and earlier layers need the gradient "
    "through them",
    "not counted: the allocator's fragmentation and caching, CUDA context and library workspaces "
    "(typically 1-3 GB per GPU), data loader buffers",
)


@dataclass(frozen=True)
class MemorySetup:
    """One device's share of a training configuration."""

    batch_size: int  # sequences per device per micro-batch
    seq_len: int
    world_size: int  # processes (devices x nodes)
    strategy: str  # auto | ddp | fsdp | fsdp2
    precision: str  # Lightning's: 32-true | bf16-mixed | bf16-true | ...
    activation_checkpointing: bool
    loss_chunk_tokens: int | None  # tokens per chunk of the chunked loss, or None: the plain loss

    @property
    def sharded(self) -> bool:
        """State divided over several processes (fsdp/fsdp2 with more than one)."""
        return self.strategy in SHARDED_STRATEGIES and self.world_size > 1

    @property
    def residual_bytes(self) -> int:
        """Bytes of one element of the residual stream: float32, except where the parameters
        themselves are half precision (bf16-true, or FSDP's bf16 parameters under bf16-mixed)."""
        half_params = self.precision in TRUE_HALF or (self.strategy in SHARDED_STRATEGIES and
                                                      self.precision in HALF_PRECISIONS)
        return 2 if half_params else 4

    @property
    def compute_bytes(self) -> int:
        """Bytes of one activation element in the matmul dtype."""
        return 2 if self.precision in HALF_PRECISIONS else 4

    @property
    def param_bytes(self) -> int:
        """Bytes of one stored parameter (master weights)."""
        return 2 if self.precision in TRUE_HALF else 4

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device: persistent state (parameters, gradients, optimizer), activations saved for
    the backward pass, and working memory on top (gathered FSDP units, autocast's weight copies,
    communication buckets, the loss's peak)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    working: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.working

    def fits(self, device_bytes: int) -> bool:
        return self.total <= device_bytes


def block_activation_bytes(cfg: ModelConfig, setup: MemorySetup) -> tuple[float, int]:
    """(bytes per token, bytes per layer independent of tokens) that one block saves for backward."""
    c = setup.compute_bytes
    D, F, H, KV, hd = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    Ea, Ekv, Ef = cfg.attn_experts, cfg.kv_experts, cfg.ffn_experts
    q_width, kv_width = Ea * H * hd, Ekv * KV * hd
    norms = 1 if cfg.parallel_residual else 2
    per_token = norms * (8 * D + 4 + c * D)  # float32 input and normalised output, the normed input h
    per_token += 2 * c * q_width + 2 * c * kv_width + 4 * Ea * H  # q, o; k, v; log-sum-exp
    router_copy = 4 * D if c < 4 else 0  # a router reads h in float32
    if Ea > 1:
        per_token += c * q_width + c * Ea + 8 * Ea + router_copy  # gated o, gates, logits and probabilities
    if Ef == 1:
        per_token += 4 * c * F
    else:
        k = cfg.ffn_active_experts
        per_token += 2 * c * k * D + 4 * c * F * k  # permuted rows in and out, SwiGLU per assignment
        per_token += 12 * Ef + 28 * k + 4 + router_copy  # logits, probs, indices, gates
    lead = KV if cfg.attn_kv == "shared" and Ea > 1 else 1
    fused = D * q_width + D * kv_width + (D * kv_width if Ekv > 1 else 0) + (q_width * D if lead > 1 else 0)
    return per_token, c * fused


def loss_bytes(cfg: ModelConfig, setup: MemorySetup) -> tuple[int, int]:
    """(bytes saved for backward, peak bytes on top while computing it) of the LM loss of one micro-batch."""
    c, n, V, D = setup.compute_bytes, setup.tokens, cfg.vocab_size, cfg.d_model
    cast = 4 if c < 4 else 0  # float32 copy of half-precision logits
    if setup.loss_chunk_tokens is None:
        return 4 * n * V, n * V * (c + cast + 4)  # log-softmax kept; logits, their float32 copy, one gradient
    chunk = min(setup.loss_chunk_tokens, n)
    per_logit = 2 * c + 4 if c < 4 else 4  # half: logits, their float32 softmax (in place), its cast back
    return c * n * D + 4 * V * D, chunk * V * per_logit


def autocast_weight_bytes(cfg: ModelConfig) -> int:
    """Bytes of autocast's bfloat16 copies of the weights that matmuls read as they are (bf16-mixed
    without FSDP): O (unless re-laid out), V (one shared set), the FFN experts and the head; the fused
    Q/K/V copies are activations, norms, routers and the embedding lookup are not cast."""
    layer = count_params(cfg).per_layer
    D, q_width, kv_width = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shared_lead = cfg.attn_kv == "shared" and cfg.attn_experts > 1 and cfg.n_kv_heads > 1
    wo = 0 if shared_lead else cfg.attn_experts * q_width * D
    wv = D * kv_width if cfg.kv_experts == 1 else 0
    return 2 * (cfg.n_layers * (wo + wv + layer.ffn) + cfg.vocab_size * D)


def activation_bytes(cfg: ModelConfig, setup: MemorySetup) -> int:
    """Bytes saved for the backward pass of one micro-batch, at its peak (the end of the forward)."""
    per_token, per_layer = block_activation_bytes(cfg, setup)
    n, L = setup.tokens, cfg.n_layers
    block = math.ceil(n * per_token) + per_layer
    if setup.activation_checkpointing:
        blocks = L * n * cfg.d_model * setup.residual_bytes + block  # block inputs; one block recomputed at a time
    else:
        blocks = L * block
    final_norm = n * (8 * cfg.d_model + 4 + setup.compute_bytes * cfg.d_model)
    return blocks + final_norm + 8 * n + loss_bytes(cfg, setup)[0]


def estimate(cfg: ModelConfig, setup: MemorySetup, *, frozen_experts: bool = False) -> MemoryEstimate:
    """Bytes per device of training ``cfg`` as ``setup`` describes (see :data:`ASSUMPTIONS`);
    ``frozen_experts``: the expert tensors get no gradients or optimizer state (``freeze_experts``)."""
    counts = count_params(cfg)
    total = counts.total
    frozen_per_block = counts.per_layer.experts if frozen_experts else 0
    trainable = total - cfg.n_layers * frozen_per_block

    def share(n: int) -> int:
        return math.ceil(n / setup.world_size) if setup.sharded else n

    p = setup.param_bytes
    params, grads, optimizer = p * share(total), p * share(trainable), 2 * p * share(trainable)
    working = loss_bytes(cfg, setup)[1]
    if setup.sharded:
        root = counts.embedding + counts.final_norm
        block = counts.per_layer.total
        working += setup.compute_bytes * (root + 2 * block) + 4 * (root + block - frozen_per_block)
    else:
        if setup.precision in ("bf16-mixed", "16-mixed"):
            working += autocast_weight_bytes(cfg)
        if setup.strategy == "ddp" and setup.world_size > 1:
            working += grads
    return MemoryEstimate(params, grads, optimizer, activation_bytes(cfg, setup), working)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``80GB`` (10^9 bytes), ``80GiB`` (2^30), ``141GB``, ``1.5TB``, or a plain number of bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(text)
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def format_bytes(n: float) -> str:
    """``12.3 GB`` (decimal units, as GPU memory is sold)."""
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"
