"""Reference bootstraps the coverage tests check, and the oracle of ``stats.joint_mean_losses``: one model's
perplexity interval and the difference of two models on one source, paired (one draw of seeds and documents
per resample, applied to both) or unpaired (each model on its own draws)."""

import numpy as np

from bam_pipeline.eval import stats
from bam_pipeline.eval.stats import MIN_RESAMPLES, DocLosses, Interval, _check, _draw_counts, _same_tokens, interval_of


def _resampled_sums(rng: np.random.Generator, values: tuple[np.ndarray, ...], resamples: int) -> list[np.ndarray]:
    """For each array of ``values`` (each (S, D)): its sum over the drawn seeds x drawn documents of
    every resample, (resamples,) each. Every array sees the same draws, in blocks of ``stats.BLOCK_ELEMENTS``."""
    s, d = values[0].shape
    seed_w = _draw_counts(rng, s, resamples)  # (R, S)
    out = [np.empty(resamples) for _ in values]
    block = max(1, stats.BLOCK_ELEMENTS // d)
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        doc_w = _draw_counts(rng, d, stop - start)  # (r, D), shared by every drawn seed
        for sums, v in zip(out, values):
            sums[start:stop] = ((doc_w @ v.T) * seed_w[start:stop]).sum(axis=1)  # (r, S) -> (r,)
    return out


def _mean_loss_reps(losses: DocLosses, resamples: int, rng: np.random.Generator) -> np.ndarray:
    nll, tokens = _resampled_sums(rng, (losses.nll, losses.tokens), resamples)
    return nll / tokens


def paired_difference(a: DocLosses, b: DocLosses, *, resamples: int = MIN_RESAMPLES, level: float = 0.95,
                      rng: np.random.Generator) -> Interval:
    """Mean loss of ``a`` minus that of ``b`` (negative: ``a`` is better) on the same test tokens, with
    its paired hierarchical bootstrap interval (one draw of seeds and documents per resample, applied
    to both models)."""
    _check(resamples, level)
    _same_tokens(a, b)
    diff, tokens = _resampled_sums(rng, (a.nll - b.nll, a.tokens), resamples)
    return interval_of(a.mean_loss - b.mean_loss, diff / tokens, n_seeds=a.n_seeds, n_docs=a.n_docs, level=level)


def unpaired_difference(a: DocLosses, b: DocLosses, *, resamples: int = MIN_RESAMPLES, level: float = 0.95,
                        rng: np.random.Generator) -> Interval:
    """The same difference as :func:`paired_difference`, with each model resampled on its own draws,
    as if the two had been scored on unrelated documents and seeds."""
    _check(resamples, level)
    _same_tokens(a, b)
    reps = _mean_loss_reps(a, resamples, rng) - _mean_loss_reps(b, resamples, rng)
    return interval_of(a.mean_loss - b.mean_loss, reps, n_seeds=a.n_seeds, n_docs=a.n_docs, level=level)


def perplexity_interval(losses: DocLosses, *, resamples: int = MIN_RESAMPLES, level: float = 0.95,
                        rng: np.random.Generator) -> Interval:
    """One model's perplexity (exp of its token-weighted mean loss over seeds and documents) with its
    hierarchical bootstrap interval: a cell of the aggregated table."""
    _check(resamples, level)
    reps = np.exp(_mean_loss_reps(losses, resamples, rng))
    return interval_of(float(np.exp(losses.mean_loss)), reps, n_seeds=losses.n_seeds, n_docs=losses.n_docs,
                       level=level)
