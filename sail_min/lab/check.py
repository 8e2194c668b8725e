r"""`python -m sail_min check`: the derivation, verified numerically on the bandit (float64).

1. For each kind of pair (offline DPO, SAIL-DP, SAIL-PP, SAIL-PR) and several random
   parameter vectors: the true gradient -grad J(theta) (autograd through the exactly
   enumerated objective, sampling and labelling probabilities included) equals the exact
   expectation of the surrogate gradient of ``objective.sail_loss`` with coefficient 1 on
   each extra term, with and without a baseline.
2. The bilevel view, without the closed form: for r = beta * (log pi_theta - log pi_ref),
   solve the lower level  max_pi E_pi[r] - beta KL(pi || pi_ref)  by Newton's method,
   differentiate the upper objective through the solution by the implicit function theorem,
       d psi*/dr = -[d2G/dpsi2]^-1 d2G/(dpsi dr),
   and chain to theta: it equals grad J(theta) of the single-level objective.
3. Information, not failures: how far online DPO (extra terms off) is from the full
   gradient, and how the error of a Monte-Carlo estimate shrinks with the batch size N.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .bandit import Bandit, batch_loss, exact_objective, exact_surrogate_loss, make_bandit, sample_pairs
from ..config import SAILConfig

TOLERANCE = 1e-8
VARIANTS = {  # name -> (route, what it is)
    "offline DPO": ("dpo", "dataset pairs, dataset labels"),
    "SAIL-DP": ("dp", "dataset pairs, policy labels"),
    "SAIL-PP": ("pp", "policy pairs, policy labels"),
    "SAIL-PR": ("pr", "policy pairs, oracle labels"),
}


def _grad(fn, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(theta), theta)
    return g


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def true_gradient(theta, bandit, route) -> torch.Tensor:
    """-grad J(theta): the gradient of the loss we minimise, by autograd on the enumeration."""
    return _grad(lambda t: -exact_objective(t, bandit, route), theta)


def surrogate_gradient(theta, bandit, route, response_coef=1.0, label_coef=1.0, baseline="none"):
    """Exact expectation of the surrogate's gradient."""
    return _grad(lambda t: exact_surrogate_loss(t, bandit, route, response_coef, label_coef, baseline), theta)


def expected_dpo_loss_per_prompt(theta, bandit, route) -> torch.Tensor:
    """E[-log sig(z) | x], one value per prompt: a baseline that does not depend on the pair."""
    with torch.no_grad():
        return torch.stack([-exact_objective(theta[m:m + 1], _one_prompt(bandit, m), route)
                            for m in range(bandit.n_prompts)])


def _one_prompt(bandit: Bandit, m: int) -> Bandit:
    return Bandit(bandit.true_reward[m:m + 1], bandit.ref_logits[m:m + 1], bandit.beta)


# --------------------------------------------------------------------------------------
# the bilevel view
# --------------------------------------------------------------------------------------
def _softmax_free(psi: torch.Tensor) -> torch.Tensor:
    """pi = softmax([psi, 0]): K-1 free logits per prompt, so the lower level has a unique optimum."""
    return torch.softmax(F.pad(psi, (0, 1)), -1)


def lower_objective(psi, reward, bandit) -> torch.Tensor:
    """G(psi, r) = sum_x ( E_{pi_psi}[r] - beta KL(pi_psi || pi_ref) )."""
    pi = _softmax_free(psi)
    return (pi * reward).sum() - bandit.beta * (pi * (pi.log() - bandit.log_ref)).sum()


def solve_lower_level(reward, bandit, tol=1e-13, max_iter=100) -> torch.Tensor:
    """argmax_psi G(psi, r) by damped Newton's method with a line search (no closed form used)."""
    M, K = reward.shape
    psi = torch.zeros(M, K - 1, dtype=reward.dtype)
    obj = lambda p: lower_objective(p.view(M, K - 1), reward, bandit)
    for _ in range(max_iter):
        grad = torch.autograd.functional.jacobian(obj, psi.flatten())
        if grad.abs().max() < tol:
            return psi
        hess = torch.autograd.functional.hessian(obj, psi.flatten())
        # Levenberg-Marquardt: shift the Hessian until it is negative definite, so the
        # step is an ascent direction far from the optimum; plain Newton near it.
        shift = max(0.0, torch.linalg.eigvalsh(hess).max().item()) * 2 + 1e-12
        step = torch.linalg.solve(hess - shift * torch.eye(len(grad), dtype=grad.dtype), -grad)
        t, base = 1.0, obj(psi.flatten())
        while obj(psi.flatten() + t * step) < base - 1e-15 and t > 1e-10:
            t /= 2
        psi = (psi.flatten() + t * step).view(M, K - 1)
    raise RuntimeError(f"lower level did not converge: |grad| = {grad.abs().max():.2e}")


def upper_objective(pi, reward, bandit, labels) -> torch.Tensor:
    """F = mean_x sum_ij pi_i pi_j [P_ij log sig(r_i - r_j) + (1 - P_ij) log sig(r_j - r_i)]."""
    d = reward[:, :, None] - reward[:, None, :]
    prefs = bandit.oracle_prefs if labels == "oracle" else torch.sigmoid(d)
    per_pair = prefs * F.logsigmoid(d) + (1 - prefs) * F.logsigmoid(-d)
    return ((pi[:, :, None] * pi[:, None, :]) * per_pair).sum((-1, -2)).mean()


def bilevel_gradient(theta, bandit, labels="oracle") -> tuple[torch.Tensor, float]:
    """dF(r_theta, pi*_{r_theta})/dtheta via a numerical lower level and implicit differentiation.

    Returns the gradient of the *loss* -F (to compare with ``true_gradient``) and
    max |pi*_r - pi_theta| (the lower-level solution must reproduce the policy).
    """
    M, K = theta.shape
    theta = theta.detach().clone().requires_grad_(True)
    reward_of_theta = bandit.beta * (torch.log_softmax(theta, -1) - bandit.log_ref)   # r = beta h
    reward = reward_of_theta.detach().requires_grad_(True)
    psi = solve_lower_level(reward.detach(), bandit)

    def grad_psi_G(p, r):
        return torch.autograd.functional.jacobian(lambda q: lower_objective(q.view(M, K - 1), r, bandit),
                                                  p, create_graph=True)
    flat = psi.flatten()
    H = torch.autograd.functional.hessian(lambda q: lower_objective(q.view(M, K - 1), reward.detach(), bandit), flat)
    cross = torch.autograd.functional.jacobian(lambda r: grad_psi_G(flat, r.view(M, K)), reward.detach().flatten())
    dpsi_dr = -torch.linalg.solve(H, cross)                                   # [M(K-1), MK]

    psi_var = flat.clone().requires_grad_(True)
    F_value = upper_objective(_softmax_free(psi_var.view(M, K - 1)), reward, bandit, labels)
    dF_dr_direct, dF_dpsi = torch.autograd.grad(F_value, (reward, psi_var))
    dF_dr = dF_dr_direct.flatten() + dF_dpsi @ dpsi_dr
    (dF_dtheta,) = torch.autograd.grad(reward_of_theta, theta, grad_outputs=dF_dr.view(M, K))
    mismatch = (_softmax_free(psi) - torch.softmax(theta, -1)).abs().max().item()
    return -dF_dtheta, mismatch


# --------------------------------------------------------------------------------------
# Monte-Carlo estimates
# --------------------------------------------------------------------------------------
def monte_carlo_errors(theta, bandit, config: SAILConfig, route, batch_sizes=(4, 16, 64, 256, 1024),
                       repeats=16, seed=0, baseline="loo") -> list[float]:
    """Mean relative error of the sampled surrogate gradient (N pairs per prompt, baseline
    "loo" or "none") against its exact expectation, over ``repeats`` independent batches."""
    g = torch.Generator().manual_seed(seed)
    exact = surrogate_gradient(theta, bandit, route)
    errors = []
    for n in batch_sizes:
        thetas = theta.detach().expand(repeats, *theta.shape).clone().requires_grad_(True)
        chosen, rejected, route_ids = sample_pairs(thetas, bandit, config, n, g)
        batch_loss(thetas, bandit, config, chosen, rejected, route_ids, baseline).loss.backward()
        errors.append(sum(relative_error(gr, exact) for gr in thetas.grad) / repeats)
    return errors


def slope(xs, ys) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def run_check(seeds=(0, 1, 2), n_prompts=4, n_responses=5, beta=0.7, print_fn=print) -> float:
    """Run every check, print a report, return the largest relative error of the exact checks."""
    worst = 0.0
    thetas = {s: torch.randn(n_prompts, n_responses, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(100 + s)) for s in seeds}
    bandits = {s: make_bandit(n_prompts, n_responses, beta=beta, seed=s) for s in seeds}
    print_fn(f"gradient of the exact objective vs exact expectation of the surrogate "
             f"(float64, M={n_prompts}, K={n_responses}, beta={beta}, {len(seeds)} seeds)")
    for name, (route, what) in VARIANTS.items():
        errs = []
        for s in seeds:
            theta, bandit = thetas[s], bandits[s]
            truth = true_gradient(theta, bandit, route)
            errs.append(relative_error(surrogate_gradient(theta, bandit, route), truth))
            baseline = expected_dpo_loss_per_prompt(theta, bandit, route)
            errs.append(relative_error(surrogate_gradient(theta, bandit, route, baseline=baseline), truth))
        worst = max(worst, *errs)
        print_fn(f"  {name:12s} ({what:30s}) relative error {max(errs):.1e} (with and without baseline)")

    print_fn("bilevel view: numerical lower level + implicit differentiation vs single-level gradient")
    for labels, route in (("oracle", "pr"), ("policy", "pp")):
        errs, mismatch = [], 0.0
        for s in seeds:
            g_bilevel, m = bilevel_gradient(thetas[s], bandits[s], labels)
            errs.append(relative_error(g_bilevel, true_gradient(thetas[s], bandits[s], route)))
            mismatch = max(mismatch, m)
        worst = max(worst, *errs)
        print_fn(f"  labels from {labels:6s}: relative error {max(errs):.1e}; "
                 f"max |pi*_r - pi_theta| = {mismatch:.1e}")

    print_fn("information (not a failure):")
    theta, bandit = thetas[seeds[0]], bandits[seeds[0]]
    full = surrogate_gradient(theta, bandit, "pr")
    online = surrogate_gradient(theta, bandit, "pr", response_coef=0.0)
    cos = F.cosine_similarity(online.flatten(), full.flatten(), dim=0).item()
    print_fn(f"  online DPO (response term off) vs full SAIL-PR gradient: relative distance "
             f"{relative_error(online, full):.3f}, cosine {cos:.3f}")
    sizes = (4, 16, 64, 256, 1024)
    for name, config, route in (("SAIL-PR", SAILConfig(route_dpo=0, route_pr=1, pr_response_coef=1), "pr"),
                                ("SAIL-PP", SAILConfig(route_dpo=0, route_pp=1, pp_coef=1), "pp")):
        errors = monte_carlo_errors(theta, bandit, config, route, sizes)
        listed = ", ".join(f"N={n}: {e:.3f}" for n, e in zip(sizes, errors))
        print_fn(f"  Monte-Carlo {name} gradient, relative error vs exact: {listed}; "
                 f"log-log slope {slope(sizes, errors):.2f} (1/sqrt(N) is -0.50)")
    print_fn(f"max relative error: {worst:.1e}")
    return worst


def main() -> int:
    worst = run_check()
    if not worst <= TOLERANCE:
        print(f"FAILED: max relative error {worst:.1e} > {TOLERANCE:.0e}")
        return 1
    return 0
