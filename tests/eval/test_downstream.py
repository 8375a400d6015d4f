"""Downstream tasks: the offline next-passage suite built from a prepared run's test documents (items,
length matching, files lm-eval reads), one offline task run end to end through lm-eval with a tiny
model, and the paper's Table 3 task list."""

from __future__ import annotations

import json

import pytest

from bam_pipeline.data.prepare import open_prepared
from bam_pipeline.errors import BamError
from bam_pipeline.eval.downstream import (
    PAPER_TASKS, build_offline_suite, next_passage_items, paper_tasks, passage_windows, run_tasks,
)
from bam_pipeline.eval.harness import harness_lm
from bam_pipeline.store.artifacts import load_model, read_artifact

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def prepared(fake_run):
    return open_prepared(fake_run / "data")


@pytest.fixture(scope="module")
def suite(prepared, tmp_path_factory):
    return build_offline_suite(prepared, tmp_path_factory.mktemp("suite"), context_tokens=32, passage_tokens=16)


def read_items(suite, task: str) -> list[dict]:
    return [json.loads(line) for line in (suite.dir / f"{task}.jsonl").read_text().splitlines()]


def test_every_item_is_its_documents_next_passage_among_three_of_other_documents(prepared, suite):
    tokenizer = prepared.tokenizer()
    assert suite.tasks == tuple(f"bam_next_passage_{s}" for s in prepared.sources)
    for source, task in zip(prepared.sources, suite.tasks):
        stream = prepared.stream(source, "test")
        texts = {doc_id: tokenizer.decode(ids) for doc_id, ids in zip(stream.doc_ids(), stream.documents())}
        items = read_items(suite, task)
        assert len(items) == suite.items[task] >= 5
        assert len({i["gold"] for i in items}) > 1  # the true passage is not always in one place
        for item in items:
            choices, truth = item["choices"], item["choices"][item["gold"]]
            assert len(choices) == len(set(choices)) == 4
            assert texts[item["doc_id"]].startswith(item["context"] + truth)  # the document's own next passage
            for other in choices:
                assert abs(len(other) - len(truth)) <= 0.1 * len(truth)
                assert other[:1].isspace()  # passages start where a word begins
                if other != truth:
                    assert not texts[item["doc_id"]].startswith(item["context"] + other)
                    assert any(other in text for doc_id, text in texts.items() if doc_id != item["doc_id"])


def test_the_suite_is_lm_eval_task_yaml_beside_local_jsonl(suite):
    for task in suite.tasks:
        text = (suite.dir / f"{task}.yaml").read_text()
        assert f"task: {task}" in text and "output_type: multiple_choice" in text
        assert "metric: acc\n" in text and "metric: acc_norm" in text and str(suite.dir.resolve()) in text
    group = (suite.dir / "bam_next_passage.yaml").read_text()
    assert group.startswith("group: bam_next_passage") and all(f"  - {t}" in group for t in suite.tasks)


def test_the_suite_is_seeded(prepared, tmp_path):
    a = build_offline_suite(prepared, tmp_path / "a", context_tokens=32, passage_tokens=16, seed=1)
    b = build_offline_suite(prepared, tmp_path / "b", context_tokens=32, passage_tokens=16, seed=1)
    c = build_offline_suite(prepared, tmp_path / "c", context_tokens=32, passage_tokens=16, seed=2)
    task = a.tasks[0]
    assert read_items(a, task) == read_items(b, task) != read_items(c, task)


def test_passages_end_where_a_word_begins():
    starts_word = [False, True, True, False]  # ids 1 and 2 begin a word
    doc = [0, 3, 1, 3, 3, 2, 0, 1, 3, 2, 3]
    assert passage_windows(doc, starts_word, 2, 3) == [(2, 5), (5, 9)]  # word starts at 2, 5, 7, 9
    assert passage_windows(doc, starts_word, 3, 2) == [(5, 7), (7, 9), (9, 11)]
    assert passage_windows(doc, starts_word, 8, 5) == []


def test_items_need_three_passages_within_the_length_tolerance():
    words = {3: " abc", 4: " def", 5: " ghi", 6: " jkl", 7: " mnopqrst"}
    docs = [[1, 2, w] for w in words]  # a two-token context, then one word

    def decode(ids):
        return "".join(words.get(i, "x") for i in ids)

    starts = [i in words for i in range(8)]
    items = next_passage_items(docs, list("abcde"), decode, starts, context_tokens=2, passage_tokens=1,
                               length_tolerance=0.1, max_items=10, seed=0)
    assert [item["doc_id"] for item in items] == list("abcd")  # e's passage has no match within 10%
    for item, word in zip(items, words.values()):
        assert item["context"] == "xx" and item["choices"][item["gold"]] == word
        assert sorted(item["choices"]) == [" abc", " def", " ghi", " jkl"]


def test_a_source_without_items_is_refused_in_one_line(prepared, tmp_path):
    with pytest.raises(BamError, match="has no test document of 10016\\+ tokens") as e:
        build_offline_suite(prepared, tmp_path / "s", context_tokens=10000, passage_tokens=16)
    assert "\n" not in str(e.value)


def test_an_offline_task_runs_end_to_end_through_lm_eval(fake_run, prepared, suite):
    pytest.importorskip("lm_eval")
    model, _ = load_model(read_artifact(fake_run / "mix" / "bam"))
    lm = harness_lm(model, prepared.tokenizer(), prepared.eos_id, batch_size=8)
    results = run_tasks(lm, [suite.group], include_path=suite.dir, bootstrap_iters=100)["results"]
    for task in (*suite.tasks, suite.group):
        row = results[task]
        assert 0.0 <= row["acc,none"] <= 1.0 and 0.0 <= row["acc_norm,none"] <= 1.0
        assert row["acc_stderr,none"] >= 0.0
    assert results[suite.tasks[0]]["sample_len"] == suite.items[suite.tasks[0]]
    with pytest.raises(BamError, match="unknown task 'arc_easy': the suite in .* has no such task"):
        run_tasks(lm, ["arc_easy"], include_path=suite.dir)


def test_the_paper_task_list():
    by_paper = {t.paper: t for t in PAPER_TASKS}
    assert (by_paper["GSM8K"].task, by_paper["GSM8K"].num_fewshot) == ("gsm8k", 8)
    assert (by_paper["MATH"].num_fewshot, by_paper["MMLU"].num_fewshot, by_paper["MBPP"].num_fewshot) == (4, 5, 3)
    assert by_paper["QuAC"].task is None and "no QuAC task" in by_paper["QuAC"].note
    assert {t.paper for t in PAPER_TASKS if t.executes_code} == {"HumanEval", "MBPP"}
    safe = {t.task for t in paper_tasks()}
    assert "humaneval" not in safe and "mbpp" not in safe and None not in safe and "arc_challenge" in safe
    assert {"humaneval", "mbpp"} <= {t.task for t in paper_tasks(allow_code_execution=True)}
    categories = {t.category for t in PAPER_TASKS}
    assert categories == {"Math", "Code", "Law", "Knowledge", "Reasoning", "MMLU"}


@pytest.mark.slow
def test_every_paper_task_name_exists_in_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)  # indexes lm-eval's task files (about 10 s)
    assert [t.task for t in PAPER_TASKS if t.task is not None and t.task not in known] == []


def test_a_task_without_accuracy_shows_its_own_metric():
    """gsm8k, nq_open, humaneval... have exact_match or pass@1, no acc: the report and the export card
    show that metric (the card once crashed on acc=None)."""
    from bam_pipeline.eval.downstream_table import result_cell, task_row

    gsm = task_row("gsm8k", {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05}, 40)
    assert gsm["acc"] is None and result_cell(gsm) == "exact_match,strict-match 0.250 ± 0.050"
    mc = task_row("arc_easy", {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6}, 10)
    assert result_cell(mc) == "0.500 ± 0.100 (0.600)"
    assert result_cell(None) == "-"
    from bam_pipeline.stages.export import _card_result

    assert _card_result(gsm) == "exact_match,strict-match 0.250 ± 0.050"  # the export card: no crash on acc=None
    assert _card_result(mc) == "acc 0.5000 ± 0.1000, acc_norm 0.6000"
