"""Mixture-of-experts SwiGLU FFN: a router (:mod:`~bam_pipeline.model.routing`), dropless dispatch,
combine, and the auxiliary losses of the routing.

E = 1 is a plain SwiGLU FFN (no router, zero aux losses). With E > 1 the router picks each token's
experts and their gates (BAM: top-1 with the full-softmax probability as gate; BTX: top-k
renormalised), and this layer adds load balancing and z-loss (:mod:`~bam_pipeline.model.routing`).

Load balancing over the global batch: with ``global_balance`` set (data-parallel training sets it),
the assignment counts f_i are summed over the processes before ``E * sum_i f_i * P_i``, while P_i
stays each process's own mean router probability (Megatron-LM's global auxiliary loss). The mean
of the processes' losses, and so the averaged gradient, is then the loss of the whole global batch
computed in one process (for equal token counts per process); per-process f_i would make it a
different, noisier loss whenever a process sees only part of the batch.

Dispatch (dropless): one stable argsort of the flattened (N*k,) expert ids, gather the token rows
into expert order, run the experts, permute the results back to assignment order and sum each
token's k outputs weighted by its gates. The sort is a permutation of the N*k assignments, so both
directions (and their backwards) are plain row gathers; no scatter-add is needed. The experts run
either as three grouped matmuls (``grouped_mm``, no host sync) or as a loop over each expert's
contiguous slice (one host sync for the counts). A layer runs the loop unless told otherwise (an exported or
loaded model never measures anything); training chooses per stage (``train.moe_dispatch``: a probe of both at
the layer's shape on the first CUDA step, training/dispatch.py) and sets :attr:`MoEFeedForward.dispatch`.
``dispatch="auto"`` is the static rule: grouped on CUDA where ``grouped_mm`` supports the tensors in the dtype
the matmuls run in (:func:`grouped_mm_supported`, :func:`matmul_dtype`: autocast's under ``bf16-mixed``), else
the loop: on CPU, torch runs float32 ``grouped_mm`` as a per-expert loop of matmuls, which measured slower than
the loop path (docs/measurements.md).

Routings where a token has 0..E experts (expert choice, :mod:`~bam_pipeline.model.routing`) carry
a (N, E) mask instead of (N, k) slots: the (expert, token) pairs of the mask, in expert order, are
gathered, run and index-added back into their tokens, weighted by their gates (an expert with no
token is skipped; a token with no expert gets 0 from this layer). Hash routing reads the token
ids, which :meth:`MoEFeedForward.forward` takes beside ``h``. A layer can also be handed another
router's decision (``routing=``: a joint router, or layer 0's under ``router_scope=model``); it then
has no router of its own, and adds auxiliary losses only when ``decides`` (the decision is its own).
Auxiliary losses by kind: top-k and soft, load balancing and z-loss; expert choice, z-loss only
(balanced by construction); hash, none (nothing is learned).

Shape legend: N tokens, D d_model, F hidden width, E experts, k experts per token, A = N*k (or the
number of mask entries).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


from ..errors import BamError
from .config import ModelConfig
from .layers import matmul_dtype, run_eager, swiglu
from .routing import Router, Routing, global_counts, load_balancing_loss, router_z_loss

DISPATCHES = ("auto", "grouped", "loop")

_grouped_mm: Callable[..., torch.Tensor] | None = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class MoEOutput(NamedTuple):
    out: torch.Tensor  # (B, T, D)
    routing: Routing | None  # the router's decision for the N tokens; None when E = 1
    counts: torch.Tensor | None  # (E,) int64 token assignments per expert; None when E = 1
    lb_loss: torch.Tensor  # scalar, 0 when E = 1
    z_loss: torch.Tensor  # scalar, 0 when E = 1

    def reshape_out(self, B: int, T: int, D: int) -> "MoEOutput":
        return self._replace(out=self.out.view(B, T, D))


def cuda_grouped_mm_runs(torch_version: str, capability: tuple[int, int]) -> bool:
    """Whether torch ``torch_version`` implements ``grouped_mm`` on a CUDA device of ``capability``: torch
    2.8's ``torch._grouped_mm`` on compute capability 9.x only (Hopper; transformers issue 47999 shows the
    crash on sm_120), 2.9 on 9.x and 10.x (its SM100 kernels), the public ``F.grouped_mm`` of 2.10 on 8.0
    and above (transformers PR 45001). Whether it is also *faster* than the loop there is for the training
    dispatch probe to measure (training/dispatch.py)."""
    major, minor = (int(v) for v in torch_version.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 8):
        return False
    if (major, minor) == (2, 8):
        return capability[0] == 9
    if (major, minor) == (2, 9):
        return capability[0] in (9, 10)
    return capability >= (8, 0)


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether ``grouped_mm`` can run these tensors, cast to ``dtype`` (default: ``x.dtype``):
    present in torch; on CPU float32/bfloat16 with every row a multiple of 16 bytes; on CUDA
    bfloat16 on a device this torch implements it for (:func:`cuda_grouped_mm_runs`)."""
    dtype = dtype or x.dtype
    if _grouped_mm is None:
        return False
    if x.device.type == "cuda":
        return dtype == torch.bfloat16 and cuda_grouped_mm_runs(torch.__version__,
                                                                torch.cuda.get_device_capability(x.device))
    if x.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    row_bytes = dtype.itemsize
    return all(t.shape[-1] * row_bytes % 16 == 0 for t in (x, *weights))


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` whose backward is the gather ``grad[inverse]`` (index_select's backward would be
    a scatter-add, several times slower on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (A, D) reordered by the permutation ``perm`` (A,); ``inverse`` undoes it."""
    return _PermuteRows.apply(x, perm, inverse)


class MoEFeedForward(nn.Module):
    """E SwiGLU experts (stacked ``w1``, ``w3`` (E, D, F) and ``w2`` (E, F, D)) with an optional router."""

    def __init__(self, cfg: ModelConfig, dispatch: str = "loop", *, own_router: bool = True) -> None:
        super().__init__()
        if dispatch not in DISPATCHES:
            raise BamError(f"unknown MoE dispatch {dispatch!r}; use one of {DISPATCHES}")
        self.cfg = cfg
        self.dispatch = dispatch
        self.global_balance = False  # f_i over every process of the default group (module docstring)
        E, D, Fh = cfg.ffn_experts, cfg.d_model, cfg.d_ff
        # own_router=False: the block hands this layer its routing (joint router, router_scope=model)
        self.router = Router(D, E, cfg.ffn_router, cfg.vocab_size) if E > 1 and own_router else None
        self.w1 = nn.Parameter(torch.empty(E, D, Fh))
        self.w3 = nn.Parameter(torch.empty(E, D, Fh))
        self.w2 = nn.Parameter(torch.empty(E, Fh, D))
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=cfg.init_std)

    def forward(self, h: torch.Tensor, token_ids: torch.Tensor | None = None, *, routing: Routing | None = None,
                decides: bool = True) -> MoEOutput:
        """``h`` (B, T, D) normed input -> gated sum of each token's top-k experts. ``token_ids`` (B, T)
        feed a hash router; ``routing`` is a decision made elsewhere (module docstring)."""
        B, T, D = h.shape
        x = h.reshape(B * T, D)  # (N, D)
        if self.cfg.ffn_experts == 1:
            zero = x.new_zeros((), dtype=torch.float32)
            # squeeze, not [0]: its backward is a view, not a zero-filled (1, ...) copy
            out = swiglu(x, self.w1.squeeze(0), self.w3.squeeze(0), self.w2.squeeze(0))
            return MoEOutput(out.view(B, T, D), None, None, zero, zero)

        if routing is None:
            if self.router is None:
                raise BamError("this MoE layer has no router of its own; pass the routing its block decided")
            routing = self.router(x, token_ids)
        if routing.chosen is not None:
            return self._forward_masked(x, routing, decides).reshape_out(B, T, D)
        gates, experts = routing.gates, routing.assignments()  # (N, k) each
        k = gates.shape[-1]

        flat_experts = experts.reshape(-1)  # (A,) assignment a = token * k + slot
        order = torch.argsort(flat_experts, stable=True)  # (A,) assignments grouped by expert
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = routing.counts()  # (E,)
        # (A, D) token row per assignment; top-1 (BAM) is x itself: its expand/reshape and the sum over
        # one slot below would each cost a pass over the activations, forward or backward
        x_assign = x if k == 1 else x[:, None, :].expand(B * T, k, D).reshape(B * T * k, D)
        xs = permute_rows(x_assign, order, inverse)  # (A, D) in expert order
        ys = permute_rows(self._experts(xs, counts), inverse, order)  # (A, D) back in assignment order
        if k == 1:
            out = ys * gates.to(ys.dtype)  # (N, D) * (N, 1)
        else:
            out = (ys.view(B * T, k, D) * gates.to(ys.dtype)[..., None]).sum(1)  # (N, D)
        lb, z = self._aux(routing, counts, decides)
        return MoEOutput(out.view(B, T, D), routing, counts, lb, z)

    def _aux(self, routing: Routing, counts: torch.Tensor, decides: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(load balancing, z-loss) of this layer's routing, by router kind (module docstring); the
        load balancing counts the global batch under ``global_balance``."""
        zero = routing.probs.new_zeros(())
        kind = self.cfg.ffn_router.kind
        lb = zero
        if decides and kind in ("topk", "soft"):
            lb = load_balancing_loss(routing.probs, global_counts(counts, self.global_balance))
        z = router_z_loss(routing.logits) if decides and self.cfg.ffn_router.learned else zero
        return lb, z

    def _forward_masked(self, x: torch.Tensor, routing: Routing, decides: bool) -> MoEOutput:
        """Dispatch by a (N, E) mask (expert choice): (N, D) rows out; the caller reshapes."""
        counts = routing.counts()  # (E,)
        out = _masked_dispatch(x, routing.chosen, routing.gates, counts, self._experts)
        return MoEOutput(out, routing, counts, *self._aux(routing, counts, decides))

    def _experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run expert e on its contiguous slice of ``xs`` (A, D), slices sized by ``counts`` (E,)."""
        dtype = matmul_dtype(xs)
        supported = grouped_mm_supported(xs, self.w1, self.w2, dtype=dtype)
        if self.dispatch == "grouped" and not supported:
            raise BamError(
                f"dispatch='grouped' cannot run {dtype} on {xs.device} with d_model={xs.shape[-1]}, "
                f"d_ff={self.w1.shape[-1]} (grouped_mm needs torch >= 2.8; float32/bfloat16 rows that are "
                "multiples of 16 bytes on CPU; bfloat16 on CUDA sm80+); use dispatch='loop' or 'auto'"
            )
        if self.dispatch == "grouped" or (self.dispatch == "auto" and supported and xs.is_cuda):
            offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,) end of each expert's slice
            xs, w1, w3, w2 = (t.to(dtype) for t in (xs, self.w1, self.w3, self.w2))
            hidden = F.silu(_grouped_mm(xs, w1, offs=offs)) * _grouped_mm(xs, w3, offs=offs)  # (A, F)
            return _grouped_mm(hidden, w2, offs=offs)  # (A, D)
        return _expert_loop(xs, counts, self.w1, self.w3, self.w2)


# Under torch.compile the two functions below run eagerly, each one graph break with only tensors crossing it:
# traced, the host read of the counts (and the mask's nonzero) would break the graph anyway, and the Python ints
# they give would specialise the code after the break to one count pattern, a recompilation per training step.

@run_eager("the loop dispatch reads the expert counts to the host")
def _expert_loop(xs: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
                 ) -> torch.Tensor:
    """Expert e's SwiGLU (``w1``, ``w3`` (E, D, F), ``w2`` (E, F, D)) on its contiguous slice of ``xs`` (A, D),
    slices sized by ``counts`` (E,), one expert at a time."""
    # unbind: one backward node per weight (indexing w[e] would build a full (E, ...) grad per expert)
    experts = zip(w1.unbind(0), w3.unbind(0), w2.unbind(0))
    sizes = counts.tolist()  # the one host sync of this path
    return torch.cat([swiglu(xs_e, *w) for xs_e, w, n in zip(xs.split(sizes), experts, sizes) if n])


@run_eager("the sizes of the expert-choice mask's pairs depend on its values")
def _masked_dispatch(x: torch.Tensor, chosen: torch.Tensor, gates: torch.Tensor, counts: torch.Tensor,
                     experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(N, D): each token's rows of ``x`` (N, D) run by the experts of the mask ``chosen`` (N, E) (``experts``
    on the (A, D) pairs in expert order, sized by ``counts`` (E,)) and added up weighted by ``gates`` (N, E)."""
    expert, token = chosen.t().nonzero(as_tuple=True)  # (A,) each, grouped by expert
    if not token.numel():  # no token reached any expert (possible at eval under expert choice)
        return x.new_zeros(x.shape)
    ys = experts(x.index_select(0, token), counts)  # (A, D)
    gate = gates[token, expert].to(ys.dtype)  # (A,)
    return x.new_zeros(x.shape, dtype=ys.dtype).index_add(0, token, ys * gate[:, None])
