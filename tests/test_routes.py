"""One route -> loss function (routes.route_loss) for the LM loop and the bandit: the loop's ``train.pair_loss``,
fed LM-shaped inputs (per-pair log-probs, labels, route ids), has in expectation over every draw of every pair of
a step exactly the gradient of the single-level objective of each route, as enumerated by the bandit."""
import itertools

import pytest
import torch

from sail_min.config import SAILConfig
from sail_min.labels import PairLabels
from sail_min.lab.bandit import _pair_and_label_probs, exact_surrogate_loss, make_bandit
from sail_min.routes import ROUTES
from sail_min.train import PairLogps, pair_loss


def expected_loop_gradient(theta, bandit, config, step_routes):
    """sum over every step c (each pair's (y1, y2) and, unless averaged out, its label) of P(c) * grad pair_loss_c."""
    log_ref = bandit.log_ref[0]
    log_pi = torch.log_softmax(theta, -1)[0]
    outcomes = []                                 # per pair: [(y1, y2, first_is_chosen, probability)]
    for route in step_routes:
        q, prefs = (t[0].detach() for t in _pair_and_label_probs(theta, bandit, route, None, None))
        averaged = config.self_labels == "expected" and route in ("dp", "pp")
        K = q.shape[0]
        outcomes.append([(i, j, True, q[i, j]) for i in range(K) for j in range(K)] if averaged else
                        [(i, j, first, q[i, j] * (prefs[i, j] if first else 1 - prefs[i, j]))
                         for i in range(K) for j in range(K) for first in (True, False)])
    routes = torch.tensor([ROUTES.index(r) for r in step_routes])
    total = 0.0
    for step in itertools.product(*outcomes):
        first, second = torch.tensor([o[0] for o in step]), torch.tensor([o[1] for o in step])
        logps = PairLogps(log_pi[first], log_pi[second], log_ref[first], log_ref[second])
        labels = PairLabels(torch.tensor([o[2] for o in step]))
        probability = torch.stack([o[3] for o in step]).prod()
        total = total + probability * pair_loss(logps, labels, routes, config).loss
    return torch.autograd.grad(total, theta)[0]


@pytest.mark.parametrize("self_labels", ["sampled", "expected"])
@pytest.mark.parametrize("step_routes, fields", [
    (("pr", "pr", "pp"), dict(route_dpo=0.0, route_pr=0.5, route_pp=0.5, pr_response_coef=0.3, pp_coef=0.2)),
    (("dpo", "dp", "pr"), dict(route_dpo=0.25, route_dp=0.5, route_pr=0.25, dp_label_coef=0.4, pr_response_coef=0.7)),
])
def test_the_loops_pair_loss_has_the_exact_expected_gradient_of_each_route(step_routes, fields, self_labels):
    bandit = make_bandit(n_prompts=1, n_responses=2, beta=0.5, seed=3)
    config = SAILConfig(beta=bandit.beta, self_labels=self_labels, **fields)
    theta = torch.tensor([[-1.0, 1.0]], dtype=torch.float64, requires_grad=True)   # far from pi*: big extra terms
    loop = expected_loop_gradient(theta, bandit, config, step_routes)
    exact, dpo_alone = torch.zeros_like(theta), torch.zeros_like(theta)
    for route in set(step_routes):                # the batch mean weighs each route by its share of the step
        share = step_routes.count(route) / len(step_routes)
        response = {"pr": config.pr_response_coef, "pp": config.pp_coef}.get(route, 0.0)
        label = {"dp": config.dp_label_coef, "pp": config.pp_coef}.get(route, 0.0)
        exact += share * torch.autograd.grad(exact_surrogate_loss(theta, bandit, route, response, label), theta)[0]
        dpo_alone += share * torch.autograd.grad(exact_surrogate_loss(theta, bandit, route, 0.0, 0.0), theta)[0]
    assert (exact - dpo_alone).abs().max() > 5e-3                     # the extra terms matter at this theta
    torch.testing.assert_close(loop, exact, rtol=1e-12, atol=1e-14)


def test_a_baseline_that_includes_the_pairs_own_loss_is_seen():
    """The enumeration is sharp: a baseline that is the mean INCLUDING the pair itself (not leave-one-out)
    correlates with the pair's own score and, with two pairs, halves the expected response term. (Pooling routes
    into one group would not bias it: another pair's loss is independent of this pair's score, so any grouping is
    unbiased; grouping by route is a variance choice.)"""
    import sail_min.objective as objective

    bandit = make_bandit(n_prompts=1, n_responses=2, beta=0.5, seed=3)
    config = SAILConfig(beta=bandit.beta, route_dpo=0.0, route_pr=1.0, pr_response_coef=1.0)
    theta = torch.tensor([[-1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    right = expected_loop_gradient(theta, bandit, config, ("pr", "pr"))
    no_term = expected_loop_gradient(theta, bandit, config.replace(response_mode="off"), ("pr", "pr"))
    original = objective.loo_baseline
    objective.loo_baseline = lambda values, groups=None: values.detach().mean().expand_as(values)
    try:
        biased = expected_loop_gradient(theta, bandit, config, ("pr", "pr"))
    finally:
        objective.loo_baseline = original
    torch.testing.assert_close(biased - no_term, (right - no_term) / 2, rtol=1e-10, atol=1e-14)
    assert (right - no_term).abs().max() > 5e-2
