"""The SAIL surrogate terms: formulas, gradients, errors, numerical stability."""
import math

import pytest
import torch
import torch.nn.functional as F

from sail_min.objective import (
    dpo_logits, dpo_loss, implicit_reward, label_term, loo_baseline,
    public_code_response_term, response_term, sail_loss,
)

F64 = torch.float64


def random_logps(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(-20 * torch.rand(n, generator=g, dtype=F64) - 1).requires_grad_(i < 2) for i in range(4)]


def test_implicit_reward_and_logits_match_their_definitions():
    pw, pl, rw, rl = random_logps()
    beta = 0.3
    assert torch.allclose(implicit_reward(pw, rw, beta), beta * (pw - rw))
    z = dpo_logits(pw, pl, rw, rl, beta)
    assert torch.allclose(z, implicit_reward(pw, rw, beta) - implicit_reward(pl, rl, beta))


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf")])
def test_bad_beta_is_rejected(beta):
    pw, pl, rw, rl = random_logps()
    with pytest.raises(ValueError, match="beta"):
        dpo_logits(pw, pl, rw, rl, beta)


def test_shape_mismatch_and_non_finite_inputs_name_the_argument():
    pw, pl, rw, rl = random_logps()
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_logits(pw, pl, rw, rl[:3], 0.1)
    bad = rl.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match=r"ref_rejected_logps has a non-finite value at index \[2\]"):
        sail_loss(pw, pl, rw, bad, 0.1)


def test_response_term_gradient_is_the_score_function_weight():
    pw, pl, rw, rl = random_logps()
    z = dpo_logits(pw, pl, rw, rl, 0.5)
    response_term(z.detach(), pw, pl).sum().backward()
    f = -F.logsigmoid(z.detach())
    assert torch.allclose(pw.grad, f) and torch.allclose(pl.grad, f)


def test_label_term_gradient():
    z = torch.linspace(-5, 5, 11, dtype=F64, requires_grad=True)
    label_term(z).sum().backward()
    # d/dz [-1/2 log sig(z)^2] = -log sig(z) * (1 - sig(z))
    assert torch.allclose(z.grad, -F.logsigmoid(z.detach()) * (1 - torch.sigmoid(z.detach())))


def test_loo_baseline_is_leave_one_out_and_independent_of_its_own_pair():
    v = torch.tensor([1.0, 2.0, 4.0, 8.0, 3.0], dtype=F64)
    groups = torch.tensor([0, 0, 0, 1, 2])
    b = loo_baseline(v, groups)
    assert torch.allclose(b, torch.tensor([3.0, 2.5, 1.5, 0.0, 0.0], dtype=F64))
    v2 = v.clone()
    v2[0] = 100.0
    assert loo_baseline(v2, groups)[0] == b[0]


def test_public_code_mode_reproduces_the_public_gradient_hook():
    """Reference: the public code registers hooks grad <- grad - coef * logsig(z) / l on the
    per-pair log-probs of a loss averaged over the batch. We build that literally here."""
    beta, coef, accumulation = 0.1, 0.3, 2
    pw, pl, rw, rl = random_logps(8)
    z = dpo_logits(pw, pl, rw, rl, beta)
    logsig = F.logsigmoid(z).detach()
    pw_hooked, pl_hooked = pw.detach().clone().requires_grad_(), pl.detach().clone().requires_grad_()
    lw, ll = pw_hooked * 1.0, pl_hooked * 1.0
    lw.register_hook(lambda g: g - coef * logsig / lw.detach())
    ll.register_hook(lambda g: g - coef * logsig / ll.detach())
    (-F.logsigmoid(dpo_logits(lw, ll, rw, rl, beta))).mean().div(accumulation).backward()

    out = sail_loss(pw, pl, rw, rl, beta, response_coef=coef, response_mode="public",
                    public_hook_scale=len(pw) * accumulation)      # the hook's weight: batch x accumulation
    (out.loss / accumulation).backward()
    assert torch.allclose(pw.grad, pw_hooked.grad) and torch.allclose(pl.grad, pl_hooked.grad)
    # sign: the public term raises the likelihood of both responses (descent direction > 0)
    extra = pw.grad - torch.autograd.grad(dpo_loss(dpo_logits(pw, pl, rw, rl, beta)).mean() / accumulation, pw)[0]
    assert (extra < 0).all()


def test_exact_mode_mean_and_coefficients():
    pw, pl, rw, rl = random_logps()
    out = sail_loss(pw, pl, rw, rl, 0.2, response_coef=0.5, label_coef=0.25, baseline="none")
    expected = (out.dpo + 0.5 * out.response + 0.25 * out.label).mean()
    assert torch.allclose(out.loss, expected)
    assert torch.allclose(out.dpo, -F.logsigmoid(out.z))
    off = sail_loss(pw, pl, rw, rl, 0.2, response_coef=0.5, response_mode="off")
    assert torch.allclose(off.loss, out.dpo.mean())


@pytest.mark.parametrize("z_value", [100.0, -100.0])
def test_losses_and_gradients_are_finite_at_extreme_logits(z_value):
    # z = beta * (pw - pl) with reference log-probs equal: pw - pl = z / beta
    beta = 0.5
    pl = torch.tensor([-300.0], dtype=F64, requires_grad=True)
    pw = (pl.detach() + z_value / beta).requires_grad_()
    ref = torch.tensor([-50.0], dtype=F64)
    out = sail_loss(pw, pl, ref, ref, beta, response_coef=1.0, label_coef=1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(pw.grad).all() and torch.isfinite(pl.grad).all()
    assert out.z.item() == pytest.approx(z_value)
    if z_value > 0:
        assert out.dpo.item() == pytest.approx(math.exp(-100), rel=1e-6)
    else:
        assert out.dpo.item() == pytest.approx(100.0, rel=1e-12)
        assert out.label.item() == pytest.approx(-0.5 * 100.0 ** 2, rel=1e-12)


def test_sail_loss_argument_errors():
    pw, pl, rw, rl = random_logps()
    with pytest.raises(ValueError, match="response_mode"):
        sail_loss(pw, pl, rw, rl, 0.1, response_mode="hook")
    with pytest.raises(ValueError, match="baseline"):
        sail_loss(pw, pl, rw, rl, 0.1, response_coef=1.0, baseline="mean")
    with pytest.raises(ValueError, match="response_coef"):
        sail_loss(pw, pl, rw, rl, 0.1, response_coef=-1.0)
    with pytest.raises(ValueError, match="label_coef"):
        sail_loss(pw, pl, rw, rl, 0.1, label_coef=torch.ones(3))
    with pytest.raises(ValueError, match="weights"):
        sail_loss(pw, pl, rw, rl, 0.1, weights=torch.ones(2))
    with pytest.raises(ValueError, match="one log-prob per pair"):
        sail_loss(*(t.view(2, 3) for t in random_logps()), 0.1)


def test_objective_imports_nothing_but_torch_and_the_standard_library():
    """objective.py can be dropped into another trainer on its own."""
    import ast
    import inspect
    import sys
    import sail_min.objective as objective
    tree = ast.parse(inspect.getsource(objective))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] or "." for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - {"__future__", "dataclasses", "torch"} == set(), imported
    assert all(name in sys.stdlib_module_names or name == "torch" for name in imported - {"__future__"})


def test_public_hook_scale_default_is_the_configs():
    from sail_min.config import PRESETS, SAILConfig

    assert SAILConfig().public_hook_scale == 8.0                   # the public code's batch 4 x accumulation 2
    assert sorted(PRESETS) == ["iterative-dpo", "offline-dpo", "online-dpo", "sail-dp", "sail-pp", "sail-pr"]
    pw, pl, rw, rl = random_logps(5)                               # not 8 pairs: the default is no pair count
    default = sail_loss(pw, pl, rw, rl, 0.1, response_coef=0.3, response_mode="public")
    scaled = sail_loss(pw, pl, rw, rl, 0.1, response_coef=0.3, response_mode="public", public_hook_scale=8)
    assert torch.equal(default.loss, scaled.loss)
    assert torch.allclose(default.parts["response"], 8 * (0.3 * default.response).mean())
    with pytest.raises(ValueError, match="public_hook_scale"):
        sail_loss(pw, pl, rw, rl, 0.1, response_mode="public", public_hook_scale=0)


def test_parts_sum_to_the_loss():
    pw, pl, rw, rl = random_logps()
    out = sail_loss(pw, pl, rw, rl, 0.2, response_coef=0.5, label_coef=0.25)
    assert torch.allclose(out.parts["dpo"] + out.parts["response"] + out.parts["label"], out.loss)
    assert torch.allclose(out.parts["label"], (0.25 * out.label).mean())


def test_expected_labels_equal_the_mean_over_sampled_labels():
    """For self-labelled pairs, the expected-label surrogate's gradient equals the exact average over
    the two labels (y1 wins w.p. sig(z), held fixed) of the sampled-label surrogate's gradient, for
    the DPO, label and response terms together; its DPO term alone has zero gradient."""
    pw, pl, rw, rl = random_logps(6, seed=3)
    beta, coef = 0.7, dict(response_coef=0.4, label_coef=0.3, baseline="none")
    every = torch.ones(6, dtype=torch.bool)
    p = torch.sigmoid(dpo_logits(pw, pl, rw, rl, beta)).detach()
    expected = sail_loss(pw, pl, rw, rl, beta, **coef, expected_labels=every)
    grad_expected = torch.autograd.grad(expected.loss, (pw, pl))
    per_pair = []                           # E_l[loss_i] = p_i loss_i(y1 wins) + (1 - p_i) loss_i(y2 wins)
    for i in range(6):
        one = lambda a, b, c, d: sail_loss(a[i:i + 1], b[i:i + 1], c[i:i + 1], d[i:i + 1], beta, **coef).loss  # noqa: E731
        per_pair.append(p[i] * one(pw, pl, rw, rl) + (1 - p[i]) * one(pl, pw, rl, rw))
    grad_average = torch.autograd.grad(torch.stack(per_pair).mean(), (pw, pl))
    for a, b in zip(grad_expected, grad_average):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    dpo_only = sail_loss(pw, pl, rw, rl, beta, expected_labels=every)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(dpo_only.loss, (pw, pl)))  # sg[H]
    assert torch.allclose(expected.dpo, -(p * p.log() + (1 - p) * (1 - p).log()))   # H(sig z)


# ---- the leave-one-out baseline is subtracted, by value ----------------------------------------
def test_loo_baseline_by_hand_with_interleaved_groups():
    values = torch.tensor([1.0, 10.0, 2.0, 20.0, 6.0, 5.0], dtype=F64)
    groups = torch.tensor([7, 3, 7, 3, 7, 9])          # ids need not be 0..n-1 or contiguous
    # group 7: {1, 2, 6}; group 3: {10, 20}; group 9: {5} alone -> 0
    expected = [(2 + 6) / 2, 20 / 1, (1 + 6) / 2, 10 / 1, (1 + 2) / 2, 0.0]
    assert loo_baseline(values, groups).tolist() == expected
    # no groups: one group of all six
    total = sum(values.tolist())
    assert torch.allclose(loo_baseline(values), torch.tensor([(total - v) / 5 for v in values.tolist()], dtype=F64))


def test_response_term_subtracts_the_loo_baseline():
    """Mutant: ``response_term`` computes b but returns f * (l_w + l_l) (or f + b)."""
    z = torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=F64)
    l_w = torch.tensor([-5.0, -7.0, -3.0, -9.0], dtype=F64, requires_grad=True)
    l_l = torch.tensor([-6.0, -4.0, -8.0, -2.0], dtype=F64, requires_grad=True)
    f = [-F.logsigmoid(torch.tensor(v, dtype=F64)).item() for v in z.tolist()]
    b = [(sum(f) - f_i) / 3 for f_i in f]                                 # leave-one-out mean, by hand
    expected = torch.tensor([(f_i - b_i) * (w + l) for f_i, b_i, w, l in
                             zip(f, b, l_w.tolist(), l_l.tolist())], dtype=F64)

    with_loo = response_term(z, l_w, l_l, baseline="loo")
    torch.testing.assert_close(with_loo, expected, rtol=1e-12, atol=1e-12)
    without = response_term(z, l_w, l_l, baseline="none")
    torch.testing.assert_close(without, torch.tensor(f, dtype=F64) * (l_w + l_l).detach())
    assert (with_loo - without).abs().min() > 0.1                        # the baseline matters here
    with_loo.sum().backward()                                             # gradient weight: f - b
    torch.testing.assert_close(l_w.grad, torch.tensor(f, dtype=F64) - torch.tensor(b, dtype=F64))
    torch.testing.assert_close(response_term(z, l_w, l_l, baseline=torch.tensor(b, dtype=F64)), with_loo)
