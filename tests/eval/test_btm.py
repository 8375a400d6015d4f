"""The BTM ensemble against Bayes' rule written out by hand for unigram experts, its reset at document
boundaries, its degenerate cases, and the prior estimated from validation rows."""

import math

import pytest
import torch

from bam_pipeline.errors import BamError
from bam_pipeline.eval.btm import ensemble_flops_per_token, ensemble_log_probs, estimate_log_prior
from bam_pipeline.model import preset
from bam_pipeline.model.counting import flops_per_token

EOS = 2
P_A = [0.7, 0.2, 0.1]  # unigram expert A over tokens 0, 1, 2 (= eos)
P_B = [0.1, 0.6, 0.3]
PRIOR = [0.3, 0.7]


def unigram_log_probs(tokens: torch.Tensor, *dists) -> torch.Tensor:
    """(N, B, T): each unigram expert's log-prob of every observed token."""
    return torch.stack([torch.tensor(d, dtype=torch.float64).log()[tokens] for d in dists])


def log_prior(p=PRIOR) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log()


def test_two_unigram_experts_follow_the_closed_form_bayes_posterior():
    seq = [0, 1, 0, EOS, 1, 1, 0]
    tokens = torch.tensor([seq])
    ens = ensemble_log_probs(unigram_log_probs(tokens, P_A, P_B), tokens, log_prior(), eos_id=EOS)
    doc_start = 0
    for t, x in enumerate(seq):
        prefix = seq[doc_start:t]
        joint_a = PRIOR[0] * math.prod(P_A[s] for s in prefix)
        joint_b = PRIOR[1] * math.prod(P_B[s] for s in prefix)
        w_a = joint_a / (joint_a + joint_b)
        assert ens.weights[0, 0, t].item() == pytest.approx(w_a, rel=1e-12)
        assert ens.log_probs[0, t].exp().item() == pytest.approx(w_a * P_A[x] + (1 - w_a) * P_B[x], rel=1e-12)
        if x == EOS:
            doc_start = t + 1
    # by hand: 0.3*0.7 + 0.7*0.1; then w_A = 0.21/0.28 = 0.75: 0.75*0.2 + 0.25*0.6; after eos the prior again
    assert ens.log_probs[0, :2].exp().tolist() == pytest.approx([0.28, 0.30], rel=1e-12)
    assert ens.log_probs[0, 4].exp().item() == pytest.approx(0.3 * 0.2 + 0.7 * 0.6, rel=1e-12)


def test_a_document_likelihood_is_the_prior_weighted_mixture_of_whole_document_likelihoods():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 2, 40, generator=g, dtype=torch.float64).mul(2).sub(3)  # (N, B, T)
    tokens = torch.randint(0, 5, (2, 40), generator=g)
    tokens[0, 9], tokens[0, 25], tokens[1, 30] = EOS + 10, EOS + 10, EOS + 10
    prior = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64).log()
    ens = ensemble_log_probs(lp, tokens, prior, eos_id=EOS + 10)
    for row, pieces in ((0, [(0, 10), (10, 26), (26, 40)]), (1, [(0, 31), (31, 40)])):
        for lo, hi in pieces:
            expected = torch.logsumexp(prior + lp[:, row, lo:hi].sum(1), 0)  # log sum_j π_j prod_t p_j(x_t)
            assert ens.log_probs[row, lo:hi].sum().item() == pytest.approx(expected.item(), rel=1e-12)


def test_the_posterior_restarts_from_the_prior_after_eos():
    tokens = torch.tensor([[0, 0, 0, EOS, 0, 0]])
    ens = ensemble_log_probs(unigram_log_probs(tokens, P_A, P_B), tokens, log_prior(), eos_id=EOS)
    assert ens.weights[:, 0, 4].tolist() == pytest.approx(PRIOR, rel=1e-12)
    assert ens.weights[0, 0, 3].item() > 0.99  # three 0s made A near certain before the eos
    joined = torch.tensor([[0, 0, 0, 1, 0, 0]])  # no boundary: the posterior carries on
    carried = ensemble_log_probs(unigram_log_probs(joined, P_A, P_B), joined, log_prior(), eos_id=EOS)
    assert carried.weights[0, 0, 4].item() > 0.9


def test_one_expert_is_that_expert():
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(1, 3, 17, generator=g) * 8  # (1, B, T) float32 input
    tokens = torch.randint(0, 4, (3, 17), generator=g)
    ens = ensemble_log_probs(lp, tokens, torch.zeros(1), eos_id=3)
    assert torch.equal(ens.log_probs, lp[0].double())
    assert torch.equal(ens.weights, torch.ones(1, 3, 17, dtype=torch.float64))


def test_two_identical_experts_are_that_expert_under_any_prior():
    g = torch.Generator().manual_seed(2)
    lp = -torch.rand(1, 2, 33, generator=g, dtype=torch.float64) * 8
    tokens = torch.randint(0, 4, (2, 33), generator=g)
    ens = ensemble_log_probs(lp.expand(2, -1, -1), tokens, log_prior([0.9, 0.1]), eos_id=3)
    torch.testing.assert_close(ens.log_probs, lp[0], rtol=0, atol=1e-12)
    assert ens.weights[0].allclose(torch.full((2, 33), 0.9, dtype=torch.float64))


def test_very_negative_log_probs_stay_finite_and_exact():
    t = 200
    tokens = torch.zeros(1, t, dtype=torch.long)
    for bad in (-1e4, -1e30):
        lp = torch.stack([torch.full((1, t), bad), torch.full((1, t), -1.0)]).double()  # (2, 1, T)
        ens = ensemble_log_probs(lp, tokens, log_prior([0.999, 0.001]), eos_id=EOS)
        assert torch.isfinite(ens.log_probs).all() and torch.isfinite(ens.weights).all()
        assert ens.log_probs[0, 0].item() == pytest.approx(math.log(0.001) - 1.0, rel=1e-12)
        torch.testing.assert_close(ens.log_probs[0, 1:], torch.full((t - 1,), -1.0, dtype=torch.float64))
    both = torch.full((2, 1, t), -1e30, dtype=torch.float64)
    assert torch.isfinite(ensemble_log_probs(both, tokens, log_prior(), eos_id=EOS).weights).all()


def test_rows_are_independent_and_shapes_hold():
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 5, 21, generator=g, dtype=torch.float64) * 6  # (N, B, T)
    tokens = torch.randint(0, 6, (5, 21), generator=g)
    prior = torch.randn(4, generator=g, dtype=torch.float64)  # unnormalised: normalised inside
    ens = ensemble_log_probs(lp, tokens, prior, eos_id=5)
    assert ens.log_probs.shape == (5, 21) and ens.weights.shape == (4, 5, 21)
    torch.testing.assert_close(ens.weights.sum(0), torch.ones(5, 21, dtype=torch.float64))
    for row in range(5):
        alone = ensemble_log_probs(lp[:, row : row + 1], tokens[row : row + 1], prior, eos_id=5)
        torch.testing.assert_close(alone.log_probs[0], ens.log_probs[row], rtol=0, atol=1e-13)


def test_inputs_are_checked():
    lp, tokens = torch.zeros(2, 1, 4), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(BamError, match="finite"):
        ensemble_log_probs(lp.clone().fill_(float("nan")), tokens, torch.zeros(2), eos_id=EOS)
    with pytest.raises(BamError, match="one value per expert"):
        ensemble_log_probs(lp, tokens, torch.zeros(3), eos_id=EOS)
    with pytest.raises(BamError, match="rows, tokens"):
        ensemble_log_probs(lp, tokens[:, :3], torch.zeros(2), eos_id=EOS)


def test_prior_is_the_mean_end_of_document_posterior_from_a_uniform_prior():
    tokens = torch.tensor([[0, 0, EOS, 1], [1, 1, 1, 1]])  # documents [0 0 eos], [1] and [1 1 1 1]
    post = []
    for doc in ([0, 0, EOS], [1], [1, 1, 1, 1]):
        a, b = math.prod(P_A[x] for x in doc), math.prod(P_B[x] for x in doc)
        post.append([a / (a + b), b / (a + b)])
    expected = [sum(p[j] for p in post) / 3 for j in range(2)]
    got = estimate_log_prior(unigram_log_probs(tokens, P_A, P_B), tokens, eos_id=EOS).exp()
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_prior_tracks_the_share_of_documents_each_expert_generated():
    g = torch.Generator().manual_seed(4)
    docs = [torch.multinomial(torch.tensor(P_A[:2]), 30, replacement=True, generator=g) for _ in range(30)]
    docs += [torch.multinomial(torch.tensor(P_B[:2]), 30, replacement=True, generator=g) for _ in range(10)]
    order = torch.randperm(40, generator=g).tolist()
    tokens = torch.stack([torch.cat([docs[i], torch.tensor([EOS])]) for i in order]).reshape(4, -1)  # (4, 310)
    prior = estimate_log_prior(unigram_log_probs(tokens, P_A, P_B), tokens, eos_id=EOS).exp()
    assert prior.tolist() == pytest.approx([0.75, 0.25], abs=0.02)
    assert prior.sum().item() == pytest.approx(1.0)
    never_wins = estimate_log_prior(unigram_log_probs(tokens, P_A, P_B, [0.01, 0.01, 0.98]), tokens, eos_id=EOS)
    assert torch.isfinite(never_wins).all()


def test_ensemble_flops_are_the_sum_of_the_experts_forward_flops():
    cfg = preset("smoke")
    assert ensemble_flops_per_token([cfg] * 4, 64) == 4 * flops_per_token(cfg, 64).total
    with pytest.raises(BamError, match="at least one expert"):
        ensemble_flops_per_token([])
