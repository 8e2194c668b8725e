"""Reused rounds (``reuse_steps > 1``): what is drawn at theta_old and used at theta is importance-weighted.

Checked by exact enumeration through ``train.pair_loss`` (the LM loop's loss): the expected gradient of a
reused pair and label equals the fresh-pair gradient at theta, for self-labelled routes (dp, pp) with labels
drawn or averaged out; the clip and where pi_old is recorded are checked on the bandit and the loop.
"""
import itertools
import math

import pytest
import torch

from sail_min.config import ROUTES, SAILConfig
from sail_min.labels import PairLabels
from sail_min.objective import IMPORTANCE_CLIP, importance_weights
from sail_min.routes import route_loss
from sail_min.train import PairLogps, pair_loss

F64 = torch.float64
K, BETA = 3, 0.7
REF = torch.tensor([0.4, -0.3, 0.1], dtype=F64)
THETA_OLD = torch.tensor([0.2, 0.5, -0.6], dtype=F64)
THETA = torch.tensor([-0.3, 0.9, -0.1], dtype=F64)
DATASET_PAIRS = [(0, 1), (2, 0), (1, 2)]          # dp: the dataset's pairs, uniform, independent of theta


def _logps(theta, y1, y2):
    log_pi, log_ref = torch.log_softmax(theta, -1), torch.log_softmax(REF, -1)
    return PairLogps(log_pi[y1].view(1), log_pi[y2].view(1), log_ref[y1].view(1), log_ref[y2].view(1))


def _p_first_wins(theta, y1, y2):
    """P_theta(y1 > y2) = sig(z) of the policy's own Bradley-Terry model."""
    h = torch.log_softmax(theta, -1) - torch.log_softmax(REF, -1)
    return torch.sigmoid(BETA * (h[y1] - h[y2])).item()


def _outcomes(route: str, draw_theta: torch.Tensor, self_labels: str):
    """(y1, y2, first wins, probability) of every pair and label a round drawn at ``draw_theta`` can hold."""
    if route == "pp":
        pi = torch.softmax(draw_theta, -1)
        pairs = [((i, j), (pi[i] * pi[j]).item()) for i, j in itertools.product(range(K), repeat=2)]
    else:
        pairs = [(pair, 1 / len(DATASET_PAIRS)) for pair in DATASET_PAIRS]
    for (y1, y2), q in pairs:
        if self_labels == "expected":                 # the loss averages the label out: y1 passed as "chosen"
            yield y1, y2, True, q
        else:
            p = _p_first_wins(draw_theta, y1, y2)
            yield y1, y2, True, q * p
            yield y1, y2, False, q * (1 - p)


def expected_gradient(route: str, self_labels: str, reused: bool, coef: float = 0.4) -> torch.Tensor:
    """E[grad pair_loss] at THETA over every one-pair batch: pairs and labels drawn at THETA_OLD and passed with
    their old log-probs (``reused``), or drawn at THETA (fresh)."""
    config = SAILConfig(route_dpo=0.0, route_pp=float(route == "pp"), route_dp=float(route == "dp"), pp_coef=coef,
                        dp_label_coef=coef, beta=BETA, baseline="none", self_labels=self_labels)
    total = torch.zeros(K, dtype=F64)
    for y1, y2, first_wins, prob in _outcomes(route, THETA_OLD if reused else THETA, self_labels):
        theta = THETA.clone().requires_grad_()
        old = _logps(THETA_OLD, y1, y2) if reused else None
        loss = pair_loss(_logps(theta, y1, y2), PairLabels(torch.tensor([first_wins])),
                         torch.tensor([ROUTES.index(route)]), config, old_logps=old)
        total += prob * torch.autograd.grad(loss.loss, theta)[0]
    return total


@pytest.mark.parametrize("self_labels", ["sampled", "expected"])
@pytest.mark.parametrize("route", ["pp", "dp"])
def test_a_reused_round_has_the_fresh_pair_gradient_in_expectation(route, self_labels):
    """Reused pairs and self-labels, importance-weighted (``routes.reuse_weights``): the expected gradient at
    theta equals the fresh-pair gradient at theta to round-off. theta moved far enough from theta_old that the
    fresh gradient differs from the gradient at theta_old, and no weight reaches the clip."""
    fresh = expected_gradient(route, self_labels, reused=False)
    reused = expected_gradient(route, self_labels, reused=True)
    assert fresh.norm() > 1e-3
    assert torch.allclose(reused, fresh, rtol=0, atol=1e-14 * fresh.norm().item()), (reused, fresh)
    pi, old = torch.softmax(THETA, -1), torch.softmax(THETA_OLD, -1)
    assert (pi[:, None] * pi[None, :] / (old[:, None] * old[None, :])).max() / min(
        min(_p_first_wins(THETA_OLD, i, j), 1 - _p_first_wins(THETA_OLD, i, j)) for i in range(K) for j in range(K)
    ) < IMPORTANCE_CLIP


def test_a_self_labelled_control_has_no_expected_gradient_fresh_or_reused():
    """SAIL-PP's control (pi = 0, drawn labels): a self-label's DPO gradient is 0 in expectation. Reused without
    the label's weight it was not (stale labels pull toward pi_old's preferences)."""
    for reused in (False, True):
        assert expected_gradient("pp", "sampled", reused, coef=0.0).abs().max() < 1e-15


def test_the_clip_caps_every_weight_and_the_term_it_multiplies():
    """``importance_weights`` never exceeds the clip, and a reused pair whose ratio is far above it gets a
    response gradient exactly clip times its unweighted one (pi_old = a much less likely pair)."""
    w = importance_weights(torch.tensor([0.0, math.log(5.0), 10.0], dtype=F64), torch.zeros(3, dtype=F64))
    assert torch.allclose(w, torch.tensor([1.0, 5.0, IMPORTANCE_CLIP], dtype=F64), rtol=1e-15, atol=0)
    config = SAILConfig(route_dpo=0.0, route_pr=1.0, pr_response_coef=0.5, baseline="none")
    chosen, rejected = torch.tensor([-1.0, -2.0], dtype=F64), torch.tensor([-1.5, -0.5], dtype=F64)
    routes = torch.full((2,), ROUTES.index("pr"))

    def response_grad(old):
        c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
        loss = route_loss(c, r, chosen - 0.1, rejected + 0.2, routes, config, old_logps=old)
        return torch.autograd.grad(loss.parts["response"], (c, r))

    same, far = response_grad((chosen, rejected)), response_grad((chosen - 6.0, rejected - 6.0))   # w = e^12
    for a, b in zip(far, same):
        assert torch.allclose(a, IMPORTANCE_CLIP * b, rtol=1e-13, atol=0)


def test_clip_bias_is_zero_below_the_clip_and_exact_above_it():
    """``bandit.clip_bias``: 0 when no pair's ratio reaches the clip, and otherwise the enumerated
    E_{pi_old}[(w - clip)_+ (f - b) grad (l1 + l2)], here recomputed with autograd through ``sail_loss``."""
    from sail_min.lab.bandit import clip_bias, make_bandit, pair_logits

    bandit = make_bandit(n_prompts=2, n_responses=4, beta=0.5, seed=2)
    theta_old = bandit.ref_logits[None].clone()
    near = theta_old + 0.05
    bias, size = clip_bias(near, theta_old, bandit)
    assert bias.item() == 0 and size.item() > 0
    far = theta_old + 5 * torch.randn(1, 2, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    bias, size = clip_bias(far, theta_old, bandit)
    pi, old = torch.softmax(far[0], -1), torch.softmax(theta_old[0], -1)
    x, i, j = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    x, i, j = x.flatten(), i.flatten(), j.flatten()
    w = pi[x, i] * pi[x, j] / (old[x, i] * old[x, j])
    assert w.max() > IMPORTANCE_CLIP
    prefs = bandit.oracle_prefs[x, i, j]
    q = old[x, i] * old[x, j]
    theta = far[0].clone().requires_grad_()
    log_pi = torch.log_softmax(theta, -1)
    z = pair_logits(far[0], bandit)[x, i, j]
    f = prefs * -torch.nn.functional.logsigmoid(z) + (1 - prefs) * -torch.nn.functional.logsigmoid(-z)
    b = (q * f).sum() / 2                                               # mean over the 2 prompts of E_old[f]
    excess = (w - IMPORTANCE_CLIP).clamp(min=0)
    surrogate = (q * excess * (f - b) * (log_pi[x, i] + log_pi[x, j])).sum()
    want = torch.autograd.grad(surrogate, theta)[0]
    assert abs(bias.item() - want.norm().item()) < 1e-12 * want.norm().item()


def test_the_bandit_records_pi_old_at_the_rounds_label_step(monkeypatch):
    """train_sampled: on a round's first step every reused pair has weight 1, on its later steps the weights
    are pi_theta / pi_old with pi_old the policy of the round's first step (not of the current step)."""
    from sail_min.lab import bandit as bandit_module

    seen = []
    original = bandit_module.batch_loss

    def spy(theta, bandit, config, chosen, rejected, route, baseline=None, old_logps=None):
        seen.append((theta.detach().clone(), chosen, rejected, old_logps))
        return original(theta, bandit, config, chosen, rejected, route, baseline=baseline, old_logps=old_logps)

    monkeypatch.setattr(bandit_module, "batch_loss", spy)
    bandit = bandit_module.make_bandit(n_prompts=3, n_responses=4, beta=0.5, seed=0)
    config = SAILConfig(route_dpo=0.0, route_pr=1.0, pr_response_coef=0.3)
    bandit_module.train_sampled(bandit, config, n_seeds=2, steps=6, pairs_per_prompt=4, eval_every=6,
                                online_pairs_per_prompt=8, reuse_steps=3, lr=0.1)
    assert len(seen) == 6
    for step, (theta, chosen, rejected, old) in enumerate(seen):
        round_start = seen[step - step % 3][0]
        log_start = torch.log_softmax(round_start, -1)
        assert torch.allclose(old[0], log_start.gather(2, chosen), rtol=0, atol=1e-15)
        assert torch.allclose(old[1], log_start.gather(2, rejected), rtol=0, atol=1e-15)
        if step % 3:                                                    # the policy moved since the round began
            now = torch.log_softmax(theta, -1)
            assert not torch.allclose(now.gather(2, chosen), old[0])


def test_the_training_loop_records_pi_old_at_the_rounds_label_step(monkeypatch, tmp_path):
    """train(): pair_loss gets, on every step of a round, the log-probs of the round's label step."""
    from sail_min import train as train_module
    from sail_min.lab.sentiment import load_base_model, load_sentiment_task

    calls = []
    original = train_module.pair_loss

    def spy(logps, labels, routes, config, old_logps=None):
        calls.append(({k: v.detach().clone() for k, v in vars(logps).items()},
                      None if old_logps is None else {k: v.clone() for k, v in vars(old_logps).items()}))
        return original(logps, labels, routes, config, old_logps)

    monkeypatch.setattr(train_module, "pair_loss", spy)
    sentiment = load_sentiment_task()
    task = train_module.Task(sentiment.preferences()[:32], sentiment.train_prompts[:32], sentiment.eval_prompts,
                             sentiment.judge, sentiment.bt_temperature)
    config = SAILConfig.preset("sail-pr", steps=4, pairs_per_step=6, eval_every=4, eval_prompts=4,
                               checkpoint_every=2, reuse_steps=2, lr=5e-3, output_dir=str(tmp_path))
    train_module.train(config, *load_base_model(), task, progress=False)
    assert len(calls) == 4
    for step, (now, old) in enumerate(calls):
        start = calls[step - step % 2][0]
        for key in ("policy_first", "policy_second"):
            assert torch.equal(old[key], start[key]), (step, key)
        if step % 2:
            assert not torch.equal(now["policy_first"], old["policy_first"])   # the policy moved: w != 1
