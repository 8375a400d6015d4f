"""lm-evaluation-harness over our model: an ``LM`` that scores and generates with
:class:`~bam_pipeline.model.BAMTransformer` and the run's ``tokenizers.Tokenizer``.

lm-eval is an optional extra (``pip install 'bam-pipeline[eval]'``), imported only when
:func:`harness_lm` is called; the rest of the package works without it.

The adapter follows lm-eval's ``TemplateLM`` (its tokenisation of context/continuation pairs, the
end-of-text token as the context of an empty prompt) and computes what its stock ``hf`` backend
computes from a Hugging Face export of the same model:
- ``loglikelihood``: requests sorted longest first, right-padded into batches of ``batch_size``;
  context and continuation left-truncated to the last ``max_seq_len + 1`` tokens; the sum of the
  continuation tokens' float32 log-probabilities, and whether each is the argmax;
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_seq_len`` tokens, the
  first conditioned on the end-of-text token, summed;
- ``generate_until``: the KV-cached decoder (:func:`~bam_pipeline.model.generation.generate`),
  requests with the same generation settings batched (left-padded), the context left-truncated to
  leave room for ``max_gen_toks``; greedy unless ``do_sample`` (then ``temperature`` and
  ``top_p``, seeded); the text cut at the first ``until`` string. It always decodes
  ``max_gen_toks`` tokens (or to the end-of-text token) before cutting.

Shape legend: B requests in a batch, T padded length, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from bam_pipeline.errors import BamError
from bam_pipeline.model.generation import GREEDY, Sampling, generate
from bam_pipeline.model.transformer import BAMTransformer

INSTALL_HINT = "install lm-evaluation-harness: pip install 'bam-pipeline[eval]' (make install does)"
DEFAULT_MAX_GEN_TOKS = 256


def require_lm_eval() -> None:
    """One BamError line when lm-eval is not installed."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:  # only its presence: importing it takes seconds
        raise BamError(f"downstream evaluation needs lm-evaluation-harness, which is not installed; {INSTALL_HINT}")


@torch.inference_mode()
def continuation_logprobs(model: BAMTransformer, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                          ) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids), left-truncated to the model's context plus one:
    the continuation's summed log-probability and whether every token of it is the argmax. One
    right-padded batch; the caller sizes it."""
    window = model.cfg.max_seq_len
    longest = max(len(cont) for _, cont in requests)
    if longest > window:
        raise BamError(f"a continuation of {longest} tokens exceeds the model's {window}-token context; "
                       "score it with loglikelihood_rolling, or shorten it")
    inputs = [(list(ctx) + list(cont))[-(window + 1):][:-1] for ctx, cont in requests]
    width = max(len(x) for x in inputs)
    device = model.tok_emb.weight.device
    ids = torch.zeros(len(inputs), width, dtype=torch.long)  # (B, T), right-padded
    for row, x in enumerate(inputs):
        ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
    logprobs = F.log_softmax(model(ids.to(device)).logits.float(), dim=-1)  # (B, T, V)
    out = []
    for row, ((_, cont), x) in enumerate(zip(requests, inputs)):
        n = len(cont)
        picked = logprobs[row, len(x) - n: len(x)]  # (n, V) predictions of the continuation tokens
        target = torch.tensor(list(cont), dtype=torch.long, device=device)
        out.append((float(picked.gather(-1, target[:, None]).sum()), bool((picked.argmax(-1) == target).all())))
    return out


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of the ``until`` strings."""
    cut = len(text)
    for stop in until:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


def sampling_of(gen_kwargs: dict[str, Any]) -> Sampling:
    """lm-eval's generation settings as our :class:`Sampling` (greedy unless ``do_sample``)."""
    if not gen_kwargs.get("do_sample", False) or float(gen_kwargs.get("temperature", 1.0)) == 0.0:
        return GREEDY
    return Sampling(temperature=float(gen_kwargs.get("temperature", 1.0)), top_p=float(gen_kwargs.get("top_p", 1.0)))


@functools.cache
def _lm_class() -> type:
    """The ``TemplateLM`` subclass (built on first use, so importing this module needs no lm-eval)."""
    require_lm_eval()
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM

    class BamHarnessLM(TemplateLM):
        """lm-eval's view of one of our models (module docstring)."""

        def __init__(self, model: BAMTransformer, tokenizer: Tokenizer, eos_id: int, *, batch_size: int = 16,
                     max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0) -> None:
            super().__init__()
            self.model = model.eval()
            self.tokenizer = tokenizer
            self.eos_id = eos_id
            self.batch_size = batch_size
            self.max_gen_toks = max_gen_toks
            self.generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(seed)

        @property
        def eot_token_id(self) -> int:
            return self.eos_id

        @property
        def max_length(self) -> int:
            return self.model.cfg.max_seq_len

        @property
        def tokenizer_name(self) -> str:
            return "bam-pipeline"

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            special = True if add_special_tokens is None else add_special_tokens
            return self.tokenizer.encode(string, add_special_tokens=special).ids

        def tok_decode(self, ids: Sequence[int]) -> str:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                                  ) -> list[tuple[float, bool]]:
            """``(key, context ids, continuation ids)`` requests -> (log-likelihood, is greedy), longest
            first in batches of ``batch_size``, answers in request order."""
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start: start + self.batch_size]
                scored = continuation_logprobs(self.model, [(requests[i][1], requests[i][2]) for i in chunk])
                for i, answer in zip(chunk, scored):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            return results

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            out = []
            for request in requests:
                (text,) = request.args
                windows = [(None, ctx, cont) for ctx, cont in map(utils.make_disjoint_window,
                           utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                           prefix_token=self.prefix_token_id,
                                                           max_seq_len=self.max_length, context_len=1))]
                total = sum(ll for ll, _ in self._loglikelihood_tokens(windows))
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
                out.append(total)
            return out

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            out: list[str] = [""] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, request in enumerate(requests):
                groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
            for members in groups.values():
                gen_kwargs = dict(requests[members[0]].args[1])
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
                room = self.max_length - new
                if room < 1:
                    raise BamError(f"max_gen_toks={new} leaves no room for a context in the model's "
                                   f"{self.max_length}-token context; lower max_gen_toks")
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start: start + self.batch_size]
                    prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-room:] for i in chunk]
                    result = generate(self.model, prompts, max_new_tokens=new, sampling=sampling_of(gen_kwargs),
                                      eos_id=self.eos_id, generator=self.generator)
                    for i, tokens in zip(chunk, result.tokens):
                        out[i] = cut_at_stop(self.tok_decode(tokens), until)
                        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            return out

    return BamHarnessLM


def harness_lm(model: BAMTransformer, tokenizer: Tokenizer, eos_id: int, *, batch_size: int = 16,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0) -> Any:
    """An lm-eval ``LM`` over ``model`` (eval mode, on its device) and the run's ``tokenizer``;
    ``eos_id`` ends a document and is the context of an empty prompt. One BamError line when
    lm-eval is not installed."""
    cls: Callable[..., Any] = _lm_class()
    return cls(model, tokenizer, eos_id, batch_size=batch_size, max_gen_toks=max_gen_toks, seed=seed)
