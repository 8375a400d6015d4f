"""Downstream tasks through lm-evaluation-harness: the offline next-passage suite built from a run's
held-out test documents, the paper's Table 3 task list for online runs, and running either.

**Offline suite** (:func:`build_offline_suite`), one multiple-choice task per source
(``bam_next_passage_<source>``): an item is a test document's first ``context_tokens`` tokens and
four candidate next passages of about ``passage_tokens`` tokens: the document's own and three
taken from other test documents of the same source, each within ``length_tolerance`` (10%) of
the true passage's length in characters, in a seeded order. Context and passages are cut where a
word begins (a token starting with whitespace), so no choice starts mid-word, and context + true
passage is the document's own text. lm-eval scores ``acc`` (the most likely
passage) and ``acc_norm`` (per byte). Each task is a YAML file beside its JSONL data (absolute
paths; the JSON builder of ``datasets`` reads it offline), plus a group ``bam_next_passage`` over
all of them; ``TaskManager(include_path=suite.dir)`` finds them.

**Paper tasks** (:data:`PAPER_TASKS`): Table 3 of the BAM paper (docs/paper.md section 10) as lm-eval
task names and shot counts; QuAC has no lm-eval task; HumanEval and MBPP execute generated code
and run only when the caller allows it (lm-eval's ``confirm_run_unsafe_code``).
"""

from __future__ import annotations

import bisect
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bam_pipeline.data.prepare import PreparedData
from bam_pipeline.errors import BamError
from bam_pipeline.eval.harness import require_lm_eval
from bam_pipeline.store.files import write_text

TEST_SPLIT = "test"
TASK_PREFIX = "bam_next_passage"
N_CHOICES = 4


@dataclass(frozen=True)
class PaperTask:
    """One downstream task of the paper's Table 3 and how lm-eval runs it."""

    paper: str  # the paper's name
    category: str  # the paper's column: Math, Code, Law, Knowledge, Reasoning, MMLU
    task: str | None  # lm-eval task (or group) name; None where lm-eval has none
    num_fewshot: int | None  # None: lm-eval's default for the task (the paper states none)
    executes_code: bool = False  # runs generated code: only with lm-eval's confirm_run_unsafe_code
    note: str = ""


PAPER_TASKS: tuple[PaperTask, ...] = (
    PaperTask("GSM8K", "Math", "gsm8k", 8),
    PaperTask("MATH", "Math", "minerva_math", 4, note="Minerva's 4-shot MATH prompt, its seven subjects"),
    PaperTask("HumanEval", "Code", "humaneval", 0, executes_code=True),
    PaperTask("MBPP", "Code", "mbpp", 3, executes_code=True),
    PaperTask("LegalBench International Citizenship Questions", "Law",
              "legalbench_international_citizenship_questions", None,
              note="the paper states no shot count; lm-eval's task is 4-shot"),
    PaperTask("Natural Questions", "Knowledge", "nq_open", 0),
    PaperTask("TriviaQA", "Knowledge", "triviaqa", 0),
    PaperTask("ARC-Easy", "Reasoning", "arc_easy", 0),
    PaperTask("ARC-Challenge", "Reasoning", "arc_challenge", 0),
    PaperTask("SIQA", "Reasoning", "social_iqa", 0),
    PaperTask("PIQA", "Reasoning", "piqa", 0),
    PaperTask("WinoGrande", "Reasoning", "winogrande", 0),
    PaperTask("QuAC", "Reasoning", None, 0, note="lm-evaluation-harness has no QuAC task"),
    PaperTask("MMLU", "MMLU", "mmlu", 5),
)


def paper_tasks(*, allow_code_execution: bool = False) -> list[PaperTask]:
    """The Table 3 tasks lm-eval can run: all with an lm-eval task, the code-executing ones only
    when ``allow_code_execution``."""
    return [t for t in PAPER_TASKS if t.task is not None and (allow_code_execution or not t.executes_code)]


@dataclass(frozen=True)
class OfflineSuite:
    """A built offline suite: its directory (the ``include_path``), task names, group and items."""

    dir: Path
    tasks: tuple[str, ...]
    group: str
    items: dict[str, int]  # task -> number of items


def passage_windows(doc: Sequence[int], starts_word: Sequence[bool], context_tokens: int, passage_tokens: int
                    ) -> list[tuple[int, int]]:
    """Consecutive passages ``(start, end)`` of ``doc`` after its context, on word boundaries: the
    first starts at the first word beginning at or after ``context_tokens``, each ends where the
    first word beginning at least ``passage_tokens`` tokens after its start begins (or at the
    document's end). ``starts_word[id]``: whether token ``id`` begins with whitespace."""
    bounds = [i for i in range(1, len(doc)) if starts_word[doc[i]]] + [len(doc)]  # word starts, ascending
    out: list[tuple[int, int]] = []
    at = bisect.bisect_left(bounds, context_tokens)
    while at < len(bounds) and bounds[at] < len(doc):
        start = bounds[at]
        at = bisect.bisect_left(bounds, start + passage_tokens)
        if at == len(bounds):
            break
        out.append((start, bounds[at]))
    return out


def next_passage_items(docs: Sequence[Sequence[int]], doc_ids: Sequence[str], decode: Callable[[Sequence[int]], str],
                       starts_word: Sequence[bool], *, context_tokens: int, passage_tokens: int,
                       length_tolerance: float, max_items: int, seed: int) -> list[dict[str, Any]]:
    """Multiple-choice items from one source's test documents (token ids without end-of-document):
    the context, four passages (the document's next one and three of other documents, each within
    ``length_tolerance`` of its length in characters), the index of the true one. Documents too
    short for a context and a passage, or without three matching passages elsewhere, give none."""
    rng = random.Random(seed)
    windows = [passage_windows(doc, starts_word, context_tokens, passage_tokens) for doc in docs]
    texts = [[decode(docs[d][s:e]) for s, e in ws] for d, ws in enumerate(windows)]
    items = []
    for d, doc in enumerate(docs):
        if not windows[d] or len(items) >= max_items:
            continue
        truth = texts[d][0]
        low, high = len(truth) * (1 - length_tolerance), len(truth) * (1 + length_tolerance)
        pool = sorted({t for other in range(len(docs)) if other != d for t in texts[other]
                       if low <= len(t) <= high and t != truth})
        if len(pool) < N_CHOICES - 1:
            continue
        choices = [truth, *rng.sample(pool, N_CHOICES - 1)]
        rng.shuffle(choices)
        items.append({"context": decode(doc[: windows[d][0][0]]), "choices": choices, "gold": choices.index(truth),
                      "doc_id": doc_ids[d]})
    return items


def task_yaml(name: str, data: Path, cache: Path) -> str:
    """An lm-eval multiple-choice task over a local JSONL file (acc and acc_norm)."""
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        f"  cache_dir: {json.dumps(str(cache))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
    ]) + "\n"


def group_yaml(tasks: Sequence[str]) -> str:
    lines = [f"group: {TASK_PREFIX}", "task:", *(f"  - {t}" for t in tasks), "aggregate_metric_list:"]
    for metric in ("acc", "acc_norm"):
        lines += [f"  - metric: {metric}", "    aggregation: mean", "    weight_by_size: true"]
    return "\n".join([*lines, "metadata:", "  version: 1.0"]) + "\n"


def build_offline_suite(prepared: PreparedData, out_dir: str | Path, *, sources: Sequence[str] | None = None,
                        context_tokens: int = 64, passage_tokens: int = 32, length_tolerance: float = 0.1,
                        max_items: int = 200, seed: int = 0) -> OfflineSuite:
    """Write the offline next-passage suite of ``prepared``'s test documents into ``out_dir`` (module
    docstring); ``sources`` default to every source of the run. Refuses a source that yields no item."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = prepared.tokenizer()

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False)

    starts_word = [decode([i])[:1].isspace() for i in range(tokenizer.get_vocab_size(with_added_tokens=True))]

    tasks, counts = [], {}
    for source in sources or prepared.sources:
        stream = prepared.stream(source, TEST_SPLIT)
        docs = [[int(i) for i in row if int(i) != prepared.eos_id] for row in stream.documents()]
        items = next_passage_items(docs, stream.doc_ids(), decode, starts_word, context_tokens=context_tokens,
                                   passage_tokens=passage_tokens, length_tolerance=length_tolerance,
                                   max_items=max_items, seed=seed)
        if not items:
            raise BamError(
                f"source {source!r} has no test document of {context_tokens + passage_tokens}+ tokens with 3 passages "
                f"of other documents within {length_tolerance:.0%} of its length; lower context_tokens/passage_tokens "
                "or give the source more test data"
            )
        name = f"{TASK_PREFIX}_{source}"
        data = out_dir / f"{name}.jsonl"
        write_text(data, "".join(json.dumps(item) + "\n" for item in items))
        write_text(out_dir / f"{name}.yaml", task_yaml(name, data.resolve(), (out_dir / ".datasets").resolve()))
        tasks.append(name)
        counts[name] = len(items)
    write_text(out_dir / f"{TASK_PREFIX}.yaml", group_yaml(tasks))
    return OfflineSuite(out_dir, tuple(tasks), TASK_PREFIX, counts)


def run_tasks(lm: Any, tasks: Sequence[str], *, include_path: str | Path | None = None,
              num_fewshot: int | None = None, limit: int | float | None = None, allow_code_execution: bool = False,
              bootstrap_iters: int = 1000, seed: int = 0) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``lm`` on ``tasks``: with ``include_path`` (an offline
    suite's directory) only the tasks there are indexed, else lm-eval's own (online datasets).
    Returns lm-eval's results dict (``results``: per task, ``acc,none``, ``acc_stderr,none``, ...)."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"the suite in {include_path}" if include_path else "lm-evaluation-harness"
        raise BamError(f"unknown task {unknown[0]!r}: {where} has no such task; known: "
                       f"{', '.join(sorted(manager.all_tasks)[:12])}{', ...' if len(manager.all_tasks) > 12 else ''}")
    # ``lm`` runs in this process alone (a rank of a distributed launch scores its own models): lm-eval reads
    # LOCAL_RANK to decide which process returns results, so it sees rank 0 while it runs
    local_rank = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=False,
                                  confirm_run_unsafe_code=allow_code_execution, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        if local_rank is None:
            os.environ.pop("LOCAL_RANK")
        else:
            os.environ["LOCAL_RANK"] = local_rank
    if results is None:
        raise BamError("lm-evaluation-harness returned no results (a non-zero rank of a distributed run)")
    return results
