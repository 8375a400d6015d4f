"""Load balancing over the global batch: two gloo processes, each on half the batch, reproduce one
process on the whole batch (the mean loss and the averaged gradient)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bam_pipeline.model import BAMTransformer, preset
from bam_pipeline.model.config import RouterConfig

CFG = preset("smoke").replace(attn_experts=2, ffn_experts=4, lb_coef=1.0, z_coef=0.1)  # aux losses weigh in
# top-1 attention routing with its own load balancing (bam_attn_top1): balanced over the global batch too
TOPK_ATTN = CFG.replace(attn_router=RouterConfig("topk", 1), attn_lb_coef=1.0)


def _batch() -> torch.Tensor:
    return torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))


def _loss_and_grads(model: BAMTransformer, batch: torch.Tensor):
    model.zero_grad(set_to_none=True)
    nll, out = model.loss(batch[:, :-1], batch[:, 1:])
    (nll + out.aux_loss).backward()
    return (nll + out.aux_loss).detach(), {n: p.grad for n, p in model.named_parameters()}


def _rank(rank: int, init_file: str, result_file: str, balance: bool, cfg) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = BAMTransformer(cfg)
    model.balance_globally(balance)
    loss, grads = _loss_and_grads(model, _batch()[2 * rank: 2 * rank + 2])
    dist.all_reduce(loss)
    for g in grads.values():
        dist.all_reduce(g)
    if rank == 0:
        torch.save({"loss": loss / 2, "grads": {n: g / 2 for n, g in grads.items()}}, result_file)
    dist.barrier()
    dist.destroy_process_group()


def _two_ranks(tmp_path, balance: bool, cfg):
    result = tmp_path / f"result-{balance}.pt"
    mp.spawn(_rank, args=(str(tmp_path / f"init-{balance}"), str(result), balance, cfg), nprocs=2, join=True)
    return torch.load(result)


@pytest.mark.parametrize("cfg", [CFG, pytest.param(TOPK_ATTN, marks=pytest.mark.slow)],  # ~9 s each
                         ids=["soft_attention", "topk_attention"])
def test_two_processes_with_global_balance_equal_one_process_on_the_global_batch(tmp_path, cfg):
    torch.manual_seed(0)
    loss, grads = _loss_and_grads(BAMTransformer(cfg), _batch())
    two = _two_ranks(tmp_path, balance=True, cfg=cfg)
    assert abs(two["loss"].item() - loss.item()) <= 1e-6 * loss.item()
    for name, g in grads.items():
        assert ((two["grads"][name] - g).norm() / g.norm()).item() <= 1e-5, name
    local = _two_ranks(tmp_path, balance=False, cfg=cfg)  # each process's own f_i: a different loss
    assert abs(local["loss"].item() - loss.item()) > 1e-4 * loss.item()
