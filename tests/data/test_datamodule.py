"""MixtureDataModule: batch shape, seeded order, DDP shards, validation set, mid-epoch resume in Lightning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from bam_pipeline.data.datamodule import MixtureDataModule, ResumableOrder
from bam_pipeline.data.mixtures import stage_mixture
from bam_pipeline.data.spec import read_data_spec
from bam_pipeline.data.storage import load_split_sequences
from bam_pipeline.errors import BamError

SEQ, BATCH = 31, 4


def _dm(prepared, cfg, seed=0, train_tokens=16 * SEQ, order_key="moe", stage="moe", domain=None, num_workers=0):
    # 16 rows / batch 4 = 4 batches per epoch
    return MixtureDataModule(
        prepared, stage_mixture(stage, read_data_spec(cfg), domain), seq_len=SEQ, batch_size=BATCH, train_tokens=train_tokens,
        val_tokens=600, seed=seed, order_key=order_key, num_workers=num_workers,
    )


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_loader_workers_give_the_batches_of_the_main_process(synthetic, context):
    """train.num_workers > 0: worker processes read the memory-mapped shards (forked, or spawned: then the
    streams are pickled as their files and mapped again) and give the same batches, in the same order."""
    import multiprocessing

    cfg, prepared = synthetic
    alone = list(_dm(prepared, cfg, seed=3).train_dataloader())
    dm = _dm(prepared, cfg, seed=3, num_workers=2)
    loader = dm.train_dataloader()
    loader.multiprocessing_context = multiprocessing.get_context(context)
    workers = list(loader)
    assert len(workers) == len(alone) == 4 and all(torch.equal(x, y) for x, y in zip(workers, alone))
    val = list(dm.val_dataloader())
    assert all(torch.equal(x, y) for x, y in zip(val, _dm(prepared, cfg, seed=3).val_dataloader()))


def test_batches_are_long_rows_in_a_seeded_order(synthetic):
    cfg, prepared = synthetic
    a = list(_dm(prepared, cfg, seed=1).train_dataloader())
    b = list(_dm(prepared, cfg, seed=1).train_dataloader())
    c = list(_dm(prepared, cfg, seed=2).train_dataloader())
    assert len(a) == 4 and all(x.dtype == torch.long and x.shape == (BATCH, SEQ + 1) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert int(torch.cat(a).eq(prepared.eos_id).sum()) > 0  # documents are packed with EOS between them


def test_each_stage_reads_its_own_windows_and_its_runs_share_them(synthetic):
    """Offsets are seeded by (seed, stage, source name): the moe stage does not replay the code
    expert's code windows (under the old (seed, source index) seeding both had code at index 0),
    and every mixture of the moe stage trains on the same rows."""
    cfg, prepared = synthetic

    def offsets(dm):
        ds = dm.train_dataset()
        names = [n for n in sorted(dm.train_token_counts) if dm.train_token_counts[n] > 0]
        return {n: seg[1] for n, seg in zip(names, ds.segments, strict=True)}

    branch = offsets(_dm(prepared, cfg, order_key="branch", stage="branch", domain="code"))
    moe = offsets(_dm(prepared, cfg))
    assert branch["code"] != moe["code"] and branch["general"] != moe["general"]
    assert moe == offsets(_dm(prepared, cfg))
    assert offsets(_dm(prepared, cfg, order_key="seed", stage="moe")) != moe
    a, b = (list(_dm(prepared, cfg, order_key=k).train_dataloader()) for k in ("moe", "branch"))
    assert all(torch.equal(x, y) for x, y in zip(a, list(_dm(prepared, cfg).train_dataloader())))
    assert not any(torch.equal(x, y) for x, y in zip(a, b))


def test_ranks_get_disjoint_shards_of_the_same_order():
    orders = [ResumableOrder(10, 2, seed=5, num_replicas=2, rank=r) for r in range(2)]
    r0, r1 = (list(o) for o in orders)
    assert len(r0) == len(r1) == 5 and not set(r0) & set(r1)
    full = ResumableOrder(10, 2, seed=5, num_replicas=1, rank=0).indices(0)
    assert r0 == full[0::2] and r1 == full[1::2]


def test_validation_is_fixed_at_most_val_tokens_and_mixed(synthetic):
    cfg, prepared = synthetic
    dm = _dm(prepared, cfg)
    v1, v2 = dm.val_sequences(), _dm(prepared, cfg, seed=9).val_sequences()
    assert torch.equal(v1, v2)
    assert v1.numel() <= 600 and v1.shape[1] == SEQ + 1 and v1.shape[0] == 600 // (SEQ + 1)


def test_load_split_sequences_are_consecutive_chunks(synthetic):
    _, prepared = synthetic
    seqs = load_split_sequences(prepared, "code", "test", SEQ)
    stream = prepared.stream("code", "test")
    assert seqs.shape == (len(stream) // (SEQ + 1), SEQ + 1)
    assert torch.equal(seqs.reshape(-1), torch.from_numpy(stream.take(0, seqs.numel())))
    assert load_split_sequences(prepared, "code", "test", SEQ, max_tokens=100).shape == (100 // (SEQ + 1), SEQ + 1)
    assert sum(prepared.stats["code"]["test"][k] > 0 for k in ("documents", "bytes", "tokens")) == 3


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        return (self.w * batch.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path, callbacks=()):
    return L.Trainer(
        max_steps=6, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks), default_root_dir=tmp_path,
        enable_checkpointing=bool(callbacks),
    )


def test_resume_mid_epoch_sees_the_batches_not_yet_trained_on(synthetic, tmp_path):
    cfg, prepared = synthetic
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    full = Recorder()
    _trainer(tmp_path, [ckpt]).fit(full, datamodule=_dm(prepared, cfg))
    assert len(full.seen) == 6  # 4 batches per epoch: steps 4..6 cross into the second epoch
    resumed = Recorder()
    _trainer(tmp_path).fit(resumed, datamodule=_dm(prepared, cfg), ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert len(resumed.seen) == 3
    assert all(torch.equal(x, y) for x, y in zip(resumed.seen, full.seen[3:]))
    assert not torch.equal(full.seen[4], full.seen[0])  # the second epoch has its own order


def test_resume_refuses_another_data_order(synthetic):
    cfg, prepared = synthetic
    state = _dm(prepared, cfg, seed=0).state_dict()
    with pytest.raises(BamError, match="differs from this run.s"):
        _dm(prepared, cfg, seed=1).load_state_dict(state)
    with pytest.raises(BamError, match="order_key='branch'"):
        _dm(prepared, cfg, order_key="branch").load_state_dict(state)
    _dm(prepared, cfg).load_state_dict(state)
