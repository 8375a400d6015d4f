"""Training and validation loaders over a token mixture: packed sequences, seeded order, mid-epoch resume.

The training set is ``n = ceil(train_tokens / seq_len)`` rows of ``seq_len + 1`` tokens. Its
``n * (seq_len + 1)`` tokens are allocated to the sources by proportion (each share off by less
than one token), read as one contiguous run per source from a seeded start offset in that source's
train stream (wrapping round, i.e. repeating the source, when its share exceeds what it has), laid
end to end and cut into rows. Rows are visited in a seeded permutation (a new one each epoch);
under DDP rank r takes every world-th row of it. The offsets and the permutation derive from the
run's seed, the ``order_key`` (the pipeline passes the stage: seed, branch or moe) and the source's
name. So each stage draws its own start offsets: the windows of two stages overlap only by chance,
while the runs of one stage share them: the data-matched mixtures train on the same rows in the
same order, so the comparison between them is about the method, not the sample (a compute-matched
run reads shorter windows from the same offsets, in another row order). Documents inside a row are
separated by the end-of-document token stored after every document.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Iterator, Mapping

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bam_pipeline.data.mixtures import allocate
from bam_pipeline.data.prepare import PreparedData
from bam_pipeline.data.storage import TokenStream
from bam_pipeline.errors import BamError


def _seed_for(*parts: int | str) -> int:
    """A 32-bit seed from integers and strings (strings by CRC-32: stable across processes)."""
    ints = [zlib.crc32(p.encode()) if isinstance(p, str) else p for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


class PackedMixture(Dataset):
    """Rows ``(seq_len + 1,)`` of a virtual token stream made of one segment per source."""

    def __init__(self, streams: Mapping[str, TokenStream], tokens: Mapping[str, int], seq_len: int, seed: int):
        self.row = seq_len + 1
        self.segments: list[tuple[TokenStream, int, int]] = []  # (stream, start offset, length)
        for name in sorted(tokens):
            if tokens[name] > 0:
                start = int(np.random.default_rng(_seed_for(seed, name)).integers(len(streams[name])))
                self.segments.append((streams[name], start, tokens[name]))
        self.ends = np.cumsum([s[2] for s in self.segments], dtype=np.int64)
        self.n = int(self.ends[-1]) // self.row

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        pos, out = i * self.row, []
        while sum(len(p) for p in out) < self.row:
            k = int(np.searchsorted(self.ends, pos, side="right"))
            seg_start = int(self.ends[k - 1]) if k else 0
            stream, offset, length = self.segments[k]
            take = min(self.row - sum(len(p) for p in out), length - (pos - seg_start))
            out.append(stream.take(offset + pos - seg_start, take))
            pos += take
        return torch.from_numpy(np.concatenate(out))  # (seq_len+1,)


class ResumableOrder(DistributedSampler):
    """Seeded permutation of row indices, sharded by rank, that can start part-way through an epoch.

    A ``DistributedSampler`` subclass so Lightning keeps it instead of wrapping it in its own.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, num_replicas: int, rank: int):
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.per_rank = n_rows // num_replicas
        # DistributedSampler's public attributes, which Lightning reads (no super().__init__: it
        # would require torch.distributed even for one process)
        self.dataset, self.shuffle, self.drop_last = None, True, True
        self.num_samples, self.total_size = self.per_rank, self.per_rank * num_replicas
        self.epoch = 0
        self.resume_epoch, self.resume_batch = 0, 0

    def batches_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, batches_consumed: int) -> None:
        """Continue after ``batches_consumed`` batches (all epochs counted) of this rank."""
        per_epoch = self.batches_per_epoch()
        self.resume_epoch, self.resume_batch = divmod(batches_consumed, per_epoch)

    def indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(_seed_for(self.seed, epoch))
        order = torch.randperm(self.n_rows, generator=g)[: self.per_rank * self.num_replicas]
        return order[self.rank:: self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        idx = self.indices(self.epoch)
        if self.epoch == self.resume_epoch:
            idx = idx[self.resume_batch * self.batch_size:]
        return iter(idx)

    def __len__(self) -> int:
        # The full epoch: Lightning counts the batches already done after a restore itself.
        return self.per_rank


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MixtureDataModule(L.LightningDataModule):
    """Packed sequences drawn from a prepared run's sources in the given token proportions."""

    def __init__(
        self,
        prepared: PreparedData,
        proportions: dict[str, float],
        *,
        seq_len: int,
        batch_size: int,
        train_tokens: int,
        val_tokens: int,
        seed: int = 0,
        order_key: str = "",
        num_workers: int = 0,
    ):
        super().__init__()
        unknown = sorted(set(proportions) - set(prepared.sources))
        if unknown:
            raise BamError(f"mixture names sources {unknown} not in the prepared data; it has {', '.join(prepared.sources)}")
        if seq_len < 1 or batch_size < 1 or train_tokens < 1 or val_tokens < 0 or 0 < val_tokens < seq_len + 1:
            raise BamError(
                f"seq_len={seq_len}, batch_size={batch_size}, train_tokens={train_tokens} must be positive "
                f"and val_tokens={val_tokens} 0 (no validation) or at least one sequence (seq_len + 1 = "
                f"{seq_len + 1}): change train.val_tokens"
            )
        self.prepared, self.proportions = prepared, {k: v for k, v in proportions.items() if v > 0}
        self.seq_len, self.batch_size, self.seed, self.num_workers = seq_len, batch_size, seed, num_workers
        self.order_key = order_key
        self.order_seed = _seed_for(seed, order_key)  # offsets and row order of this stage
        self.train_rows = math.ceil(train_tokens / seq_len)
        self.train_token_counts = allocate(self.proportions, self.train_rows * (seq_len + 1))
        self.val_tokens = val_tokens
        self._batches_consumed = 0
        self._order: ResumableOrder | None = None
        self.repeats = self._repeats()
        for name, times in self.repeats.items():
            print(f"data: source {name!r} repeated {times:.2f}x (its train split is smaller than its share)", flush=True)

    def _repeats(self) -> dict[str, float]:
        """Passes over each source's train split that its share needs, where more than one."""
        out = {}
        for name, need in self.train_token_counts.items():
            have = len(self.prepared.stream(name, "train"))
            if need > have:
                out[name] = need / have
        return out

    def train_dataset(self) -> PackedMixture:
        streams = {n: self.prepared.stream(n, "train") for n in self.train_token_counts}
        return PackedMixture(streams, self.train_token_counts, self.seq_len, self.order_seed)

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        rank, world = _rank_world()
        self._order = ResumableOrder(len(ds), self.batch_size, self.order_seed, world, rank)
        self._order.resume_at(self._batches_consumed)
        return DataLoader(ds, batch_size=self.batch_size, sampler=self._order, num_workers=self.num_workers)

    def val_sequences(self) -> torch.Tensor:
        """At most ``val_tokens`` of the validation splits in the same proportions, fixed order."""
        rows = self.val_tokens // (self.seq_len + 1)
        parts = []
        for name, n in allocate(self.proportions, rows).items():
            stream = self.prepared.stream(name, "val")
            n = min(n, len(stream) // (self.seq_len + 1))
            if n:
                parts.append(torch.from_numpy(stream.take(0, n * (self.seq_len + 1)).reshape(n, self.seq_len + 1)))
        if not parts:
            raise BamError(f"val_tokens={self.val_tokens} gives no validation sequence of {self.seq_len + 1} tokens")
        return torch.cat(parts)  # (N_val, seq_len+1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_sequences(), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    # ---- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        consumed = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else self._batches_consumed
        return {"batches_consumed": int(consumed), "seed": self.seed, "order_key": self.order_key,
                "train_rows": self.train_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"seed": self.seed, "order_key": self.order_key, "train_rows": self.train_rows}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise BamError(
                f"checkpoint's data order ({', '.join(f'{k}={v!r}' for k, v in theirs.items())}) differs from this "
                f"run's ({', '.join(f'{k}={v!r}' for k, v in mine.items())}); resume with the same data settings"
            )
        self._batches_consumed = int(state["batches_consumed"])
        if self._order is not None:
            self._order.resume_at(self._batches_consumed)
