"""Text generation with the KV cache: greedy, temperature and top-p sampling, seeded, for a batch
of prompts; and the cache-free greedy loop that checks it.

:func:`generate` left-pads the prompts into one batch (:mod:`~bam_pipeline.model.kv_cache`: each
sequence keeps its own positions and never sees the padding, so a prompt decodes as it would
alone), runs them through the model once to fill a cache sized for the prompt plus every new
token, then feeds one token per sequence per step. A sequence stops at ``eos_id`` (which it
keeps as its last token) and the batch stops when every sequence has stopped or
``max_new_tokens`` were drawn. Sampling draws from one ``torch.Generator`` for the whole batch:
a seed fixes the output of a given batch of prompts.

:func:`greedy_without_cache` recomputes the whole prefix at every step and takes the argmax: the
slow oracle the cached decoder is tested against, and the baseline of
``benchmarks/bench_generate.py``.

Shape legend: B prompts, T padded prompt length, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..errors import BamError
from .kv_cache import KVCache
from .transformer import BAMTransformer


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``temperature == 0`` is greedy (argmax); otherwise softmax of
    the logits divided by ``temperature``, kept to the smallest set of most probable tokens whose
    probability reaches ``top_p`` (nucleus sampling; 1 keeps every token)."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise BamError(f"temperature={self.temperature!r} must be a number >= 0 (0 is greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise BamError(f"top_p={self.top_p!r} must be in (0, 1] (1 keeps every token)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` produced for each prompt, in prompt order."""

    tokens: list[list[int]]  # the new tokens, ending with eos_id where the sequence stopped there
    stopped_at_eos: list[bool]
    cache_bytes_per_token: float  # KV cache bytes per token of one sequence, measured from its tensors


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: ids (B, T) int64 and valid (B, T) bool (False: padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            valid[row, width - len(prompt):] = True
    return ids, valid


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` (B, V) with every token outside the nucleus set to 0 (not renormalised): a token is
    kept when the tokens more probable than it hold less than ``top_p`` of the mass."""
    if top_p >= 1:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V) each
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the more probable tokens
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token (B,) int64 of each row of ``logits`` (B, V) under ``sampling``; a BamError when a logit
    is not finite (weights that are not finite are refused when a model is loaded: its forward pass overflows)."""
    if not bool(torch.isfinite(logits).all()):
        raise BamError("the model's next-token logits are not finite though its weights are: its forward pass "
                       "overflows, and it cannot generate; train it again with a lower train.lr")
    if sampling.greedy:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / sampling.temperature, dim=-1)  # (B, V)
    return torch.multinomial(top_p_filter(probs, sampling.top_p), 1, generator=generator).squeeze(-1)


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int) -> None:
    """Refuse an empty batch, an empty prompt, a negative budget and a prompt that with its new
    tokens would not fit the context."""
    if not prompts:
        raise BamError("no prompts to continue; give at least one prompt")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise BamError(f"prompt {empty[0]} is empty; give every prompt at least one token")
    if max_new_tokens < 1:
        raise BamError(f"max_new_tokens={max_new_tokens} must be at least 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > max_seq_len:
        raise BamError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context "
            f"max_seq_len={max_seq_len}; shorten the prompt or lower max_new_tokens"
            + (f" to at most {max_seq_len - longest}" if longest < max_seq_len else "")
        )


@torch.inference_mode()
def generate(model: BAMTransformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = GREEDY, eos_id: int | None = None, generator: torch.Generator | None = None,
             pad_id: int = 0) -> Generation:
    """Continue every prompt (token ids) with up to ``max_new_tokens`` tokens, with the KV cache.

    ``eos_id``: stop a sequence after it draws this token (None: never stop early).
    ``generator``: the random source of sampling (seeded for reproducible output; on the model's
    device); greedy decoding draws nothing. ``pad_id`` fills the left padding (any id; never read).
    """
    check_prompts(prompts, max_new_tokens, model.cfg.max_seq_len)
    device = model.tok_emb.weight.device
    ids, valid = left_pad(prompts, pad_id)
    cache = KVCache.for_model(model, len(prompts), ids.shape[1] + max_new_tokens)
    logits = model(ids.to(device), cache=cache, valid=valid.to(device), last_only=True).logits[:, -1]  # (B, V)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    drawn = []
    for _ in range(max_new_tokens):
        token = next_tokens(logits, sampling, generator)  # (B,)
        drawn.append(torch.where(done, pad_id, token))
        if eos_id is not None:
            done = done | (token == eos_id)
        if len(drawn) == max_new_tokens or bool(done.all()):
            break
        logits = model(token[:, None], cache=cache).logits[:, -1]
    rows = torch.stack(drawn, dim=1).tolist()  # (B, new)
    finished = done.tolist()
    tokens = [row[: row.index(eos_id) + 1] if stopped else row for row, stopped in zip(rows, finished)]
    return Generation(tokens, finished, cache.bytes_per_token())


@torch.inference_mode()
def greedy_without_cache(model: BAMTransformer, prompt: Sequence[int], max_new_tokens: int,
                         eos_id: int | None = None) -> list[int]:
    """Greedy continuation of one prompt recomputing the whole sequence for every new token."""
    check_prompts([prompt], max_new_tokens, model.cfg.max_seq_len)
    seq = torch.tensor([list(prompt)], dtype=torch.long, device=model.tok_emb.weight.device)  # (1, T)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(seq, last_only=True).logits[0, -1].argmax())
        new.append(token)
        if token == eos_id:
            break
        seq = torch.cat([seq, seq.new_tensor([[token]])], dim=1)
    return new


def cache_bytes_per_token(model: BAMTransformer) -> float:
    """KV cache bytes per token of one sequence for ``model``, measured on a one-position cache."""
    return KVCache.for_model(model, 1, 1).bytes_per_token()


# ---- text in, text out -------------------------------------------------------------------------
class TextTokenizer(Protocol):
    """What :func:`generate_text` needs of a tokenizer (a ``tokenizers.Tokenizer`` has it)."""

    def encode(self, sequence: str) -> object: ...  # an Encoding: ``.ids``

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class TextGeneration:
    """One prompt's continuation: the prompt's ids, the new ids and their text."""

    prompt: str
    prompt_ids: list[int]
    tokens: list[int]
    text: str
    stopped_at_eos: bool


def generate_text(model: BAMTransformer, tokenizer: TextTokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  sampling: Sampling = GREEDY, eos_id: int | None = None, seed: int = 0, batch_size: int = 8
                  ) -> tuple[list[TextGeneration], float]:
    """Continue text prompts: each encoded as the tokenizer encodes a document (its post-processor
    included, as ``transformers``' tokenizer of an export encodes it), decoded in batches of
    ``batch_size`` with :func:`generate`, sampling from one generator seeded with ``seed``. Returns
    the continuations in prompt order and the KV cache bytes per token measured while decoding."""
    if batch_size < 1:
        raise BamError(f"batch_size={batch_size} must be a positive integer")
    for i, text in enumerate(prompts):
        if not text.strip():
            raise BamError(f"prompt {i} is empty; give every prompt some text to continue")
    ids = [list(tokenizer.encode(text).ids) for text in prompts]
    check_prompts(ids, max_new_tokens, model.cfg.max_seq_len)
    generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(seed)
    out: list[TextGeneration] = []
    cache_bytes = 0.0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start: start + batch_size]
        result = generate(model, chunk, max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id,
                          generator=generator)
        cache_bytes = result.cache_bytes_per_token
        for j, (tokens, stopped) in enumerate(zip(result.tokens, result.stopped_at_eos)):
            shown = tokens[:-1] if stopped else tokens  # the end-of-document token is not text
            out.append(TextGeneration(prompts[start + j], chunk[j], tokens, tokenizer.decode(shown), stopped))
    return out, cache_bytes
