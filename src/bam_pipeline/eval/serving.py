"""What each model costs to serve, the paper's Table 7 and section 7.3 measured on this run's models: total and
active parameters, forward FLOPs per token at the paper's context of 256 with and without the LM head
(:mod:`bam_pipeline.model.counting`), the KV cache's bytes per token read from the cache tensors
(:meth:`bam_pipeline.model.kv_cache.KVCache.bytes_per_token`) and the decode latency per generated token.

Latency is measured, never computed from FLOPs: greedy decoding with the KV cache
(:func:`bam_pipeline.model.generation.generate`), batch 1, a prompt of ``max_seq_len - 16`` tokens and
:data:`NEW_TOKENS` new ones (section 7.3: 16 tokens from a 256-token prompt, the paper's context). The whole call
is timed, the prompt's forward pass included (section 7.3 times the whole generation), and divided by the new
tokens. Each model runs at one thread and at the threads torch runs with, each count fixed while timed and
torch's own count restored after. The models are measured in one process, interleaved: each of ``rounds``
rounds loads every model in turn (untimed) and, at each thread count, warms up untimed (the prompt and one
cached step: every kind of forward pass the timed call makes) and decodes once timed; a model's figure is the
median of its rounds. Eval measures it with the eval speeds whenever eval runs
(never on a no-op rerun) and ``stage=generate`` for its one model.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bam_pipeline.errors import BamError
from bam_pipeline.eval.names import about
from bam_pipeline.model.counting import count_params, flops_per_token
from bam_pipeline.model.generation import cache_bytes_per_token, generate
from bam_pipeline.model.transformer import BAMTransformer
from bam_pipeline.store.artifacts import Artifact, load_model, read_model_config

NEW_TOKENS = 16  # tokens generated per timed decode (section 7.3)
WARM_UP_TOKENS = 2  # the untimed decode before each timed one: the prompt's forward pass and one cached step
FLOPS_CONTEXT = 256  # the context of Table 7's FLOPs per token


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_name(device: torch.device) -> str:
    """The device measured on: the GPU's name, or the CPU's model and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores"


def thread_counts() -> tuple[int, ...]:
    """The CPU thread counts latency is measured at: one, and the threads torch runs with (once when that is one)."""
    return tuple(sorted({1, torch.get_num_threads()}))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU threads fixed at ``n`` inside the block, its own count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decode_prompt(max_seq_len: int, vocab_size: int) -> list[int]:
    """The timed prompt: ``max_seq_len - NEW_TOKENS`` token ids, the same for every model of a vocabulary."""
    if max_seq_len <= NEW_TOKENS:
        raise BamError(f"a model of max_seq_len={max_seq_len} has no room for a prompt and {NEW_TOKENS} new tokens; "
                       f"decode latency needs a context above {NEW_TOKENS}")
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (max_seq_len - NEW_TOKENS,), generator=gen).tolist()


def decode_seconds(model: BAMTransformer, prompt: Sequence[int]) -> float:
    """Seconds per generated token of one greedy decode of :data:`NEW_TOKENS` tokens after ``prompt``, batch 1,
    with the KV cache (the prompt's forward pass included)."""
    device = model.tok_emb.weight.device
    start = time.perf_counter()
    generate(model, [prompt], max_new_tokens=NEW_TOKENS)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / NEW_TOKENS


@dataclass(frozen=True)
class DecodeCost:
    """One model's measured serving cost: KV cache bytes per token of one sequence, and at each thread count
    every round's seconds per generated token (empty lists when latency was not timed)."""

    cache_bytes_per_token: float
    seconds_per_token: dict[int, list[float]]

    def latency(self, threads: int) -> float | None:
        """The median seconds per generated token at ``threads`` (None: not timed)."""
        rounds = self.seconds_per_token.get(threads)
        return statistics.median(rounds) if rounds else None


def measure_decode(loaders: Mapping[str, Callable[[], BAMTransformer]], *, rounds: int,
                   threads: Sequence[int]) -> dict[str, DecodeCost]:
    """Every model's :class:`DecodeCost`, interleaved (the module docstring): ``loaders`` maps a label to what
    loads its model (called once per round, untimed); ``rounds`` 0 reads the cache bytes alone."""
    seconds: dict[str, dict[int, list[float]]] = {label: {t: [] for t in threads} for label in loaders}
    cache_bytes: dict[str, float] = {}
    for _ in range(max(rounds, 1)):  # one pass for the cache bytes when latency is not timed
        for label, load in loaders.items():
            model = load()
            cache_bytes[label] = cache_bytes_per_token(model)
            prompt = decode_prompt(model.cfg.max_seq_len, model.cfg.vocab_size)
            for t in threads if rounds else ():
                with torch_threads(t):
                    generate(model, [prompt], max_new_tokens=WARM_UP_TOKENS)  # the prompt's pass and a decode step
                    seconds[label][t].append(decode_seconds(model, prompt))
            del model
    return {label: DecodeCost(cache_bytes[label], seconds[label]) for label in loaders}


@dataclass(frozen=True)
class ServingRow:
    """One model's serving cost: parameters, forward FLOPs per token at :data:`FLOPS_CONTEXT` with and without
    the LM head, and what :func:`measure_decode` measured."""

    model: str  # the artifact's label
    display: str
    params_total: int
    params_active: int
    flops_per_token: float
    flops_per_token_without_head: float
    prompt_tokens: int
    cost: DecodeCost

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "display": self.display, "params_total": self.params_total,
                "params_active": self.params_active, "flops_per_token": self.flops_per_token,
                "flops_per_token_without_head": self.flops_per_token_without_head,
                "prompt_tokens": self.prompt_tokens, "kv_cache_bytes_per_token": self.cost.cache_bytes_per_token,
                "seconds_per_token": {str(t): r for t, r in self.cost.seconds_per_token.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ServingRow":
        cost = DecodeCost(d["kv_cache_bytes_per_token"], {int(t): r for t, r in d["seconds_per_token"].items()})
        return cls(d["model"], d["display"], d["params_total"], d["params_active"], d["flops_per_token"],
                   d["flops_per_token_without_head"], d["prompt_tokens"], cost)


@dataclass(frozen=True)
class ServingCosts:
    """metrics.json's ``serving`` section: every model's :class:`ServingRow` and how they were measured."""

    rows: list[ServingRow]
    machine: str
    device: str
    threads: tuple[int, ...]
    rounds: int  # 0: latency not timed (eval.latency_rounds)
    new_tokens: int = NEW_TOKENS
    flops_context: int = FLOPS_CONTEXT
    by_label: dict[str, ServingRow] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_label", {r.model: r for r in self.rows})

    def ratio(self, of: str, to: str, value: Callable[[ServingRow], float | None]) -> float | None:
        """``value`` of model ``of`` over that of model ``to`` (None: either is not in the run or not measured)."""
        if of not in self.by_label or to not in self.by_label:
            return None
        a, b = value(self.by_label[of]), value(self.by_label[to])
        return None if a is None or b is None else a / b

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "device": self.device, "threads": list(self.threads), "rounds": self.rounds,
                "new_tokens": self.new_tokens, "flops_context": self.flops_context,
                "models": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ServingCosts":
        return cls([ServingRow.from_dict(r) for r in d["models"]], d["machine"], d["device"], tuple(d["threads"]),
                   d["rounds"], d["new_tokens"], d["flops_context"])


def serving_costs(arts: Sequence[Artifact], *, device: torch.device, rounds: int) -> ServingCosts:
    """The serving cost of every model of ``arts`` (loaded without re-verifying checksums, as eval's speeds are),
    measured on ``device`` in ``rounds`` interleaved rounds."""
    threads = thread_counts()
    loaders = {a.label: (lambda a=a: load_model(a, verify=False, device=str(device))[0]) for a in arts}
    measured = measure_decode(loaders, rounds=rounds, threads=threads)
    rows = []
    for art in arts:
        cfg = read_model_config(art)
        flops, params = flops_per_token(cfg, FLOPS_CONTEXT), count_params(cfg)
        rows.append(ServingRow(art.label, about(art).display, params.total, params.active, flops.total,
                               flops.non_embedding, cfg.max_seq_len - NEW_TOKENS, measured[art.label]))
    return ServingCosts(rows, machine_name(device), str(device), threads, rounds)


def threads_phrase(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def rounds_phrase(n: int) -> str:
    """How a latency figure summarises ``n`` rounds."""
    return "one round" if n == 1 else f"the median of {n} rounds"


def latency_line(cost: DecodeCost, *, rounds: int, prompt_tokens: int, machine: str) -> str:
    """One line of a model's measured decode latency at each thread count and how it was measured."""
    if not rounds:
        return "decode latency: not timed (eval.latency_rounds=0)"
    at = ", ".join(f"{cost.latency(t) * 1e3:.2f} ms at {threads_phrase(t)}" for t in sorted(cost.seconds_per_token))
    return (f"decode latency per generated token: {at} (greedy, batch 1, KV cache, a {prompt_tokens}-token prompt "
            f"and {NEW_TOKENS} new tokens, {rounds_phrase(rounds)} after a warm-up; {machine})")
