"""Bootstrap intervals on synthetic per-document losses with a known true difference, and claim verdicts
on hand-made intervals."""

import math

import numpy as np
import pytest
from bootstrap_oracles import paired_difference, perplexity_interval, unpaired_difference

from bam_pipeline.errors import BamError
from bam_pipeline.eval import stats
from bam_pipeline.eval.stats import (DOCUMENTS_ONLY, FAILS, HOLDS, NOT_RESOLVED, SEEDS_AND_DOCUMENTS, DocLosses,
                                     Interval, claim_verdict)


def synthetic(rng, *, seeds, docs, delta, seed_sd=0.0, doc_sd=0.0, noise_sd=0.0, difficulty_sd=0.8):
    """Two models' losses on the same documents: B's per-token loss is a document's difficulty; A's adds
    ``delta`` (the true difference) plus a seed effect, a document effect shared by every seed, and
    noise per (seed, document). Token counts vary by document, independently of the effects."""
    tokens = np.broadcast_to(rng.integers(20, 400, size=docs), (seeds, docs)).copy()  # (S, D)
    difficulty = rng.normal(3.5, difficulty_sd, size=docs)  # (D,)
    loss_b = difficulty + rng.normal(0, 0.1, size=(seeds, docs))  # (S, D) per token
    diff = (delta + rng.normal(0, seed_sd, size=(seeds, 1)) + rng.normal(0, doc_sd, size=docs)
            + rng.normal(0, noise_sd, size=(seeds, docs)))  # (S, D) per token
    return DocLosses(tokens * (loss_b + diff), tokens), DocLosses(tokens * loss_b, tokens)


def coverage(rng, trials, delta, **kw):
    hits = 0
    for _ in range(trials):
        iv = paired_difference(*synthetic(rng, delta=delta, **kw), rng=rng)
        hits += iv.low <= delta <= iv.high
    return hits / trials, iv


def test_documents_only_interval_covers_the_true_difference_95_percent_of_the_time():
    rate, last = coverage(np.random.default_rng(0), 500, 0.05, seeds=1, docs=100, doc_sd=0.3, noise_sd=0.3)
    assert last.covers == DOCUMENTS_ONLY and last.n_seeds == 1 and last.n_docs == 100
    assert 0.92 <= rate <= 0.98, rate


def test_documents_shared_by_seeds_are_drawn_once_per_resample():
    # A document effect shared by three seeds: drawing documents afresh for each seed would average it
    # over the seeds and cover about three times in four.
    rate, last = coverage(np.random.default_rng(1), 400, 0.05, seeds=3, docs=60, doc_sd=0.3, noise_sd=0.1)
    assert last.covers == SEEDS_AND_DOCUMENTS and last.n_seeds == 3
    assert 0.92 <= rate <= 0.98, rate


def test_pairing_resolves_a_small_consistent_difference_the_unpaired_interval_misses():
    rng = np.random.default_rng(2)
    a, b = synthetic(rng, seeds=1, docs=200, delta=-0.02, noise_sd=0.01, difficulty_sd=1.5)
    paired = paired_difference(a, b, rng=np.random.default_rng(3))
    unpaired = unpaired_difference(a, b, rng=np.random.default_rng(3))
    assert paired.estimate == unpaired.estimate == pytest.approx(a.mean_loss - b.mean_loss)
    assert paired.high < 0
    assert unpaired.low < 0 < unpaired.high
    assert claim_verdict({"c": paired}).status == HOLDS
    assert claim_verdict({"c": unpaired}).status == NOT_RESOLVED


def test_seed_variance_widens_the_interval_beyond_documents_only():
    rng = np.random.default_rng(4)
    a, b = synthetic(rng, seeds=4, docs=100, delta=0.05, seed_sd=0.1, noise_sd=0.05)
    both = paired_difference(a, b, rng=np.random.default_rng(5))
    # the same losses pooled into one row per document: the same estimate, resampled over documents only
    pooled = paired_difference(DocLosses(a.nll.sum(0, keepdims=True), a.tokens.sum(0, keepdims=True).astype(int)),
                               DocLosses(b.nll.sum(0, keepdims=True), b.tokens.sum(0, keepdims=True).astype(int)),
                               rng=np.random.default_rng(5))
    assert both.estimate == pytest.approx(pooled.estimate)
    assert (both.covers, pooled.covers) == (SEEDS_AND_DOCUMENTS, DOCUMENTS_ONLY)
    assert both.high - both.low > 5 * (pooled.high - pooled.low)


def test_estimates_are_token_weighted():
    a = DocLosses(np.array([[10.0, 30.0]]), np.array([[10, 10]]))  # per token 1 and 3
    b = DocLosses(np.array([[20.0, 10.0]]), np.array([[10, 10]]))  # per token 2 and 1
    assert paired_difference(a, b, rng=np.random.default_rng(0)).estimate == pytest.approx(2.0 - 1.5)
    c = DocLosses(np.array([[10.0, 300.0]]), np.array([[10, 100]]))  # 310 nats over 110 tokens
    assert perplexity_interval(c, rng=np.random.default_rng(0)).estimate == pytest.approx(math.exp(310 / 110))


def test_perplexity_interval_of_a_constant_loss_is_that_loss_in_every_block(monkeypatch):
    monkeypatch.setattr(stats, "BLOCK_ELEMENTS", 7 * 30)  # 7 resamples a block: many blocks, a partial last one
    tokens = np.random.default_rng(6).integers(1, 50, size=(3, 30))
    iv = perplexity_interval(DocLosses(2.5 * tokens, tokens), rng=np.random.default_rng(7))
    assert iv.estimate == iv.low == iv.high == pytest.approx(math.exp(2.5))
    assert iv.resamples == 2000 and iv.covers == SEEDS_AND_DOCUMENTS


def test_perplexity_interval_brackets_the_estimate():
    rng = np.random.default_rng(8)
    tokens = rng.integers(20, 400, size=(2, 80))
    iv = perplexity_interval(DocLosses(tokens * rng.normal(3.0, 0.5, size=(2, 80)), tokens), rng=rng)
    assert iv.low < iv.estimate < iv.high
    assert math.log(iv.low) < 3.0 < math.log(iv.high)


def test_same_generator_seed_same_interval():
    a, b = synthetic(np.random.default_rng(9), seeds=2, docs=50, delta=0.1, noise_sd=0.2)
    first = paired_difference(a, b, rng=np.random.default_rng(10))
    assert paired_difference(a, b, rng=np.random.default_rng(10)) == first
    assert paired_difference(a, b, rng=np.random.default_rng(11)) != first


def iv(low, high):
    return Interval((low + high) / 2, low, high, 3, 100, SEEDS_AND_DOCUMENTS, 0.95, 2000)


def test_verdict_holds_only_when_every_column_lies_below_zero():
    v = claim_verdict({"code": iv(-0.5, -0.2), "law": iv(-0.3, -0.01), "math": iv(-0.9, -0.4)})
    assert (v.status, v.column, v.interval) == (HOLDS, "law", iv(-0.3, -0.01))


def test_verdict_fails_when_any_column_lies_above_zero():
    v = claim_verdict({"code": iv(-0.5, -0.2), "law": iv(0.01, 0.3), "math": iv(0.2, 0.4), "avg": iv(-0.1, 0.1)})
    assert (v.status, v.column) == (FAILS, "math")


def test_verdict_not_resolved_names_the_column_furthest_from_holding():
    v = claim_verdict({"code": iv(-0.5, -0.2), "law": iv(-0.2, 0.05), "math": iv(-0.1, 0.3)})
    assert (v.status, v.column) == (NOT_RESOLVED, "math")
    assert claim_verdict({"code": iv(-0.2, 0.0)}).status == NOT_RESOLVED  # touching 0 does not exclude it
    with pytest.raises(BamError, match="at least one column"):
        claim_verdict({})


def test_inputs_are_checked():
    ones = np.ones((2, 3), dtype=int)
    a = DocLosses(ones * 2.0, ones)
    with pytest.raises(BamError, match="same test tokens"):
        paired_difference(a, DocLosses(ones * 2.0, ones * 2), rng=np.random.default_rng(0))
    with pytest.raises(BamError, match="same test tokens"):
        paired_difference(a, DocLosses(np.ones((2, 4)), np.ones((2, 4), dtype=int)), rng=np.random.default_rng(0))
    with pytest.raises(BamError, match="at least 2000"):
        paired_difference(a, a, resamples=100, rng=np.random.default_rng(0))
    with pytest.raises(BamError, match="one shape"):
        DocLosses(np.ones(3), np.ones(3, dtype=int))
    with pytest.raises(BamError, match="positive integer token count"):
        DocLosses(np.ones((1, 2)), np.array([[1, 0]]))
    with pytest.raises(BamError, match="not finite"):
        DocLosses(np.array([[1.0, np.nan]]), np.ones((1, 2), dtype=int))


def test_one_document_gives_a_zero_width_interval_and_no_verdict():
    # the smoke experiment's Code column: one scored test document, BAM a little worse than BTX on it
    tokens = np.array([[1984]])
    a, b = DocLosses(tokens * 5.6002, tokens), DocLosses(tokens * 5.6000, tokens)
    iv = paired_difference(a, b, rng=np.random.default_rng(0))
    assert iv.zero_width and iv.low > 0  # every resample is that one document: a "confident" +0.0002
    v = claim_verdict({"Code": iv})
    assert v.status == NOT_RESOLVED and v.status not in (HOLDS, FAILS)
    assert v.reason.startswith("Code has 1 test document: fewer than eval.min_documents=5")
    assert "data.split.test" in v.reason and not v.above and not v.below


def source_iv(low, high, **scored):
    docs = tuple(stats.SourceDocs(s, n, 60) for s, n in scored.items())
    return Interval((low + high) / 2, low, high, 1, sum(scored.values()), DOCUMENTS_ONLY, 0.95, 2000, docs)


def test_a_verdict_needs_the_minimum_of_documents_in_every_source_behind_it():
    clear = {"General": source_iv(-0.3, -0.1, general=40), "Code": source_iv(-0.3, -0.1, code=5)}
    assert claim_verdict(clear).status == HOLDS
    # an Average with plenty of documents in all but one of its sources
    few = {**clear, "Average": source_iv(0.1, 0.3, general=40, code=5, law=4)}
    v = claim_verdict(few)
    assert (v.status, v.column) == (NOT_RESOLVED, "Average")
    assert v.reason.startswith("Law has 4 test documents (of 60 in its split): fewer than eval.min_documents=5")
    assert "eval.max_tokens_per_source" in v.reason and "data.split.test" not in v.reason
    assert claim_verdict(few, min_documents=4).status == FAILS  # eval.min_documents is the threshold
    # without per-source counts, the interval's own document count is checked
    assert "has 3 test documents" in claim_verdict({"c": Interval(-0.2, -0.3, -0.1, 1, 3, DOCUMENTS_ONLY, 0.95,
                                                                  2000)}).reason


def test_a_zero_width_interval_is_no_evidence_whatever_the_number_of_documents():
    tokens = np.random.default_rng(1).integers(20, 400, size=(1, 50))
    b = DocLosses(tokens * np.random.default_rng(2).normal(3.0, 0.5, size=(1, 50)), tokens)
    a = DocLosses(b.nll + 0.01 * tokens, tokens)  # exactly 0.01 nats per token worse on every document
    iv = paired_difference(a, b, rng=np.random.default_rng(3))
    assert iv.n_docs == 50 and iv.zero_width
    v = claim_verdict({"law": iv, "code": source_iv(0.1, 0.2, code=50)})
    assert v.status == NOT_RESOLVED and "zero width" in v.reason and v.column == "law"


def test_a_verdict_names_the_columns_on_each_side_of_zero():
    v = claim_verdict({"code": iv(-0.5, -0.2), "law": iv(0.01, 0.3), "math": iv(-0.1, 0.1)})
    assert (v.status, v.below, v.above, v.reason) == (FAILS, ("code",), ("law",), "")
