"""The exactly solvable bandit: closed-form optimum, exact gradients, the two facts, training."""
import pytest
import torch

from sail_min.bandit import (
    exact_objective, exact_surrogate_loss, expected_reward, kl, make_bandit, pair_logits,
    reference_pair_probs, train_sampled,
)
from sail_min.check import (
    bilevel_gradient, lower_objective, monte_carlo_errors, relative_error, slope, solve_lower_level,
    surrogate_gradient, true_gradient,
)
from sail_min.config import ROUTES, SAILConfig

F64 = torch.float64


@pytest.fixture(scope="module")
def problem():
    bandit = make_bandit(n_prompts=3, n_responses=4, beta=0.6, seed=3)
    theta = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    return bandit, theta


def grad_of(fn, theta):
    theta = theta.detach().clone().requires_grad_()
    return torch.autograd.grad(fn(theta), theta)[0]


def test_closed_form_optimum_solves_the_lower_level(problem):
    bandit, _ = problem
    psi = solve_lower_level(bandit.true_reward, bandit)
    numeric = torch.softmax(torch.nn.functional.pad(psi, (0, 1)), -1)
    assert torch.allclose(numeric, torch.softmax(bandit.optimal_logits, -1), atol=1e-12)
    # and no perturbation of it does better
    best = lower_objective(psi, bandit.true_reward, bandit)
    for seed in range(5):
        noise = 0.1 * torch.randn(psi.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
        assert lower_objective(psi + noise, bandit.true_reward, bandit) < best


@pytest.mark.parametrize("route", ROUTES)
def test_surrogate_gradient_equals_true_gradient(problem, route):
    bandit, theta = problem
    assert relative_error(surrogate_gradient(theta, bandit, route), true_gradient(theta, bandit, route)) < 1e-12


@pytest.mark.parametrize("route", ["pp", "pr"])
def test_dropping_the_response_term_changes_the_gradient(problem, route):
    bandit, theta = problem
    partial = surrogate_gradient(theta, bandit, route, response_coef=0.0)
    assert relative_error(partial, true_gradient(theta, bandit, route)) > 0.05


@pytest.mark.parametrize("route", ["dp", "pp"])
def test_self_labelled_dpo_gradient_is_zero_in_expectation(problem, route):
    """Labels drawn from sig(z): E_label[grad log sig(z_label)] = sig(1-sig) - (1-sig)sig = 0."""
    bandit, theta = problem
    dpo_only = surrogate_gradient(theta, bandit, route, response_coef=0.0, label_coef=0.0)
    assert dpo_only.abs().max() < 1e-15
    oracle = surrogate_gradient(theta, bandit, "pr", response_coef=0.0)
    assert oracle.abs().max() > 1e-3  # the same term with oracle labels is not zero


@pytest.mark.parametrize("route", ["dp", "pp"])
def test_label_term_minimises_the_binary_entropy_of_own_preferences(problem, route):
    """E_label[-log sig(z) grad log sig(z)]... equals grad of E_pairs[H(sig(z))], H the binary entropy."""
    bandit, theta = problem

    def mean_entropy(t):
        p = torch.sigmoid(pair_logits(t, bandit))
        q = (torch.softmax(t, -1)[:, :, None] * torch.softmax(t, -1)[:, None, :]).detach() \
            if route == "pp" else reference_pair_probs(bandit)
        return (q * -(p * p.log() + (1 - p) * (1 - p).log())).sum((-1, -2)).mean()

    label_only = surrogate_gradient(theta, bandit, route, response_coef=0.0, label_coef=1.0)
    assert relative_error(label_only, grad_of(mean_entropy, theta)) < 1e-12
    # so a small descent step on the label term lowers the entropy
    assert mean_entropy(theta - 1e-3 * label_only) < mean_entropy(theta)


@pytest.mark.parametrize("labels,route", [("oracle", "pr"), ("policy", "pp")])
def test_bilevel_gradient_by_implicit_differentiation_matches_single_level(problem, labels, route):
    bandit, theta = problem
    g_bilevel, mismatch = bilevel_gradient(theta, bandit, labels)
    assert mismatch < 1e-12
    assert relative_error(g_bilevel, true_gradient(theta, bandit, route)) < 1e-10


def test_baseline_keeps_the_gradient_unbiased(problem):
    bandit, theta = problem
    baseline = torch.tensor([0.3, -2.0, 5.0], dtype=F64)
    with_b = grad_of(lambda t: exact_surrogate_loss(t, bandit, "pr", baseline=baseline), theta)
    assert relative_error(with_b, surrogate_gradient(theta, bandit, "pr")) < 1e-12


def test_monte_carlo_error_shrinks_like_one_over_sqrt_n(problem):
    bandit, theta = problem
    sizes = (8, 32, 128, 512)
    errors = monte_carlo_errors(theta, bandit, SAILConfig(route_dpo=0, route_pr=1, pr_response_coef=1), "pr", sizes)
    assert errors == sorted(errors, reverse=True)
    assert -0.6 < slope(sizes, errors) < -0.4


def test_exact_objective_is_maximised_by_pi_star_for_oracle_dataset_dpo():
    """Offline DPO with full coverage: pi* is a stationary point of the dataset objective."""
    bandit = make_bandit(n_prompts=3, n_responses=4, beta=0.6, seed=1)
    g = grad_of(lambda t: exact_objective(t, bandit, "dpo"), bandit.optimal_logits)
    assert g.abs().max() < 1e-12


def test_training_is_deterministic_and_online_dpo_reaches_the_optimum():
    bandit = make_bandit(n_prompts=4, n_responses=5, beta=0.5, seed=0)
    online = SAILConfig(route_dpo=0.0, route_pr=1.0)
    a = train_sampled(bandit, online, n_seeds=2, steps=300, pairs_per_prompt=32, eval_every=100)
    b = train_sampled(bandit, online, n_seeds=2, steps=300, pairs_per_prompt=32, eval_every=100)
    assert a == b
    assert a["step"] == [0, 100, 200, 300]
    optimum = expected_reward(bandit.optimal_logits, bandit).item()
    start = expected_reward(bandit.ref_logits, bandit).item()
    # online DPO closes more than 90% of the reward gap, and ends near pi* (KL(pi || pi*) small)
    assert min(a["reward"][-1]) > start + 0.9 * (optimum - start)
    assert max(a["kl_opt"][-1]) < 0.05 * kl(bandit.ref_logits, bandit.optimal_logits).item()


def test_non_finite_steps_are_skipped_and_counted():
    """The public-code term divides by log pi(y), which reaches 0 on a tabular policy."""
    bandit = make_bandit(n_prompts=16, n_responses=12, beta=0.3, ref_scale=2.0, seed=0)
    public = SAILConfig(route_dpo=0.7, route_pr=0.3, pr_response_coef=0.3, response_mode="public")
    hist = train_sampled(bandit, public, n_seeds=3, steps=400, eval_every=100)
    assert sum(hist["skipped_steps"]) > 0
    assert all(torch.isfinite(torch.tensor(v)).all() for v in hist["reward"] + hist["kl_opt"])


def test_dataset_routes_need_a_dataset():
    from sail_min.bandit import sample_pairs
    bandit = make_bandit(n_prompts=2, n_responses=3)
    with pytest.raises(ValueError, match="offline_chosen"):
        sample_pairs(bandit.ref_logits[None], bandit, SAILConfig(), 4, torch.Generator())
