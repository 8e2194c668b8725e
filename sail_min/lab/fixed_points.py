r"""Where each variant's exact expected update leads: fixed points of the bandit's exact flow.

With every pair and label enumerated (``bandit.exact_surrogate_loss``), a config's expected update is
the field

    G(theta) = sum_routes P(route) * grad E_route[sail_loss]      (q, P held fixed at theta)

and training with infinite data, fresh samples and a small step follows d theta / dt = -G(theta).
A fixed point solves G(theta) = 0 (up to the softmax's constant per prompt). The controls' fixed point is
pi* (a DPO term with oracle labels on any pair distribution of full support is stationary there); each
extra term moves it. ``fixed_point`` follows the flow (Adam) from pi_ref and polishes the end with
Newton's method; ``sweep`` does it for each value of a coefficient.

The field of one prompt depends on that prompt's logits only, so the Jacobian is block diagonal:
K central differences (every prompt perturbed at once) give all M blocks of K x K.

``python -m sail_min fixed-points --out results/bandit`` writes fixed_points.json (the fixed
points of notebook 02: presets, coefficient sweeps, two references, argmax labels, and the finite-sample
decomposition of SAIL-PR's gap to its control), read by the notebook, which re-checks each stored point.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from .bandit import Bandit, exact_surrogate_loss, expected_reward, kl, make_bandit
from ..config import ROUTES, SAILConfig


def field(theta: torch.Tensor, bandit: Bandit, config: SAILConfig) -> torch.Tensor:
    r"""G(theta) = sum_k P(route k) grad E_k[sail_loss], the exact expected surrogate gradient of a config
    (every pair and label enumerated; dataset pairs: two reference samples with oracle labels), [M, K]."""
    theta = theta.detach().clone().requires_grad_(True)
    response = dict(dp=0.0, pp=config.pp_coef, pr=config.pr_response_coef)
    label = dict(dp=config.dp_label_coef, pp=config.pp_coef, pr=0.0)
    loss = sum(p * exact_surrogate_loss(theta, bandit, route, response.get(route, 0.0), label.get(route, 0.0))
               for route, p in zip(ROUTES, config.route_probs) if p > 0)
    return torch.autograd.grad(loss, theta)[0]


def jacobian_blocks(theta: torch.Tensor, bandit: Bandit, config: SAILConfig, eps: float = 1e-5) -> torch.Tensor:
    """dG[x, i] / dtheta[x, j] by central differences, [M, K, K] (prompts do not interact)."""
    K = theta.shape[-1]
    columns = []
    for j in range(K):
        step = torch.zeros_like(theta)
        step[:, j] = eps
        columns.append((field(theta + step, bandit, config) - field(theta - step, bandit, config)) / (2 * eps))
    return torch.stack(columns, -1)


def newton(theta: torch.Tensor, bandit: Bandit, config: SAILConfig, tol: float = 1e-13, max_iter: int = 20):
    """Polish a point near a fixed point with Newton's method on G(theta) = 0, per prompt, the softmax gauge
    fixed by adding 1 1^T / K to each block (G sums to 0 and J 1 = 0); a step is kept only if it lowers
    max |G|. Returns (theta, max |G|, Newton steps taken). Start it where the flow ended: from far away
    Newton can land on an unstable fixed point."""
    theta = theta.detach().clone()
    K = theta.shape[-1]
    ones = torch.full((K, K), 1.0 / K, dtype=theta.dtype)
    residual = field(theta, bandit, config).abs().max().item()
    for it in range(max_iter):
        if residual < tol:
            return theta, residual, it
        g = field(theta, bandit, config)
        # least squares (SVD, rcond 1e-12): a response of negligible probability leaves a numerically null column
        step = torch.linalg.lstsq(jacobian_blocks(theta, bandit, config) + ones, g[..., None], rcond=1e-12,
                                  driver="gelsd").solution[..., 0]
        new_residual = field(theta - step, bandit, config).abs().max().item()
        if not new_residual < residual:
            return theta, residual, it
        theta, residual = theta - step, new_residual
    return theta, residual, max_iter


def is_stable(theta: torch.Tensor, bandit: Bandit, config: SAILConfig) -> float:
    """The slowest decay rate of the flow -G near theta: min real part of the Jacobian's eigenvalues on the
    directions that change the policy (> 0: a stable fixed point)."""
    K = theta.shape[-1]
    basis = torch.linalg.qr(torch.eye(K, dtype=theta.dtype) - 1.0 / K)[0][:, : K - 1]   # orthogonal to 1
    J = basis.T @ jacobian_blocks(theta, bandit, config) @ basis
    return torch.linalg.eigvals(J).real.min().item()


def flow(bandit: Bandit, config: SAILConfig, steps: int = 3000, lr: float = 0.05, start=None) -> torch.Tensor:
    """Adam on the exact field from pi_ref (or ``start``): the flow of infinite fresh data."""
    theta = (bandit.ref_logits if start is None else start).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        theta.grad = field(theta, bandit, config)
        opt.step()
    return theta.detach()


def fixed_point(bandit: Bandit, config: SAILConfig, steps: int = 2000, lr: float = 0.05, start=None) -> dict:
    """Follow the flow from pi_ref, polish with Newton; report the point and where it is."""
    theta, residual, iterations = newton(flow(bandit, config, steps, lr, start), bandit, config)
    return describe(theta, bandit, config) | {"residual": residual, "newton_iterations": iterations}


def describe(theta: torch.Tensor, bandit: Bandit, config: SAILConfig) -> dict:
    """KL(pi || pi*), true reward, KL(pi || pi_ref), stability, and the logits themselves."""
    return {"kl_opt": kl(theta, bandit.optimal_logits).item(), "reward": expected_reward(theta, bandit).item(),
            "kl_ref": kl(theta, bandit.ref_logits).item(), "min_decay_rate": is_stable(theta, bandit, config),
            "logits": theta.tolist()}


def sweep(bandit: Bandit, config_of, coefs, steps: int = 1000) -> list[dict]:
    """The fixed point of each coefficient's flow from pi_ref (``fixed_point``); ``config_of(c)`` builds the
    config. (Continuing from the previous coefficient's point instead can end on another fixed point: where
    pi_ref gives a response almost no mass, the field is nearly flat and several stable points exist.)"""
    return [{"coef": c, **fixed_point(bandit, config_of(c), steps)} for c in coefs]


def where_mass_goes(theta: torch.Tensor, bandit: Bandit) -> dict:
    r"""Where a fixed point puts the mass it gains over pi*: gained = sum_y max(pi(y) - pi*(y), 0) per prompt, and
    the share of it on responses whose true reward is below pi*'s mean reward E_{pi*}[r*] on that prompt
    (averaged over prompts, weighted by the gained mass)."""
    pi, opt = torch.softmax(theta, -1), torch.softmax(bandit.optimal_logits, -1)
    gain = (pi - opt).clamp(min=0)
    below = bandit.true_reward < (opt * bandit.true_reward).sum(-1, keepdim=True)
    return {"gained_mass": gain.sum(-1).mean().item(), "share_below_mean": ((gain * below).sum() / gain.sum()).item()}


def expected_pair_loglik(reward_gap: torch.Tensor) -> torch.Tensor:
    r"""E_label[log sig(z)] of a pair at pi*, where z = r*_1 - r*_2 and the label is the oracle's sig(r*_1 - r*_2):
    -H(sig(gap)), the negative binary entropy: -log 2 for a tie (a coin flip), -> 0 for a clear gap."""
    p = torch.sigmoid(reward_gap)
    return p * torch.nn.functional.logsigmoid(reward_gap) + (1 - p) * torch.nn.functional.logsigmoid(-reward_gap)


class ArgmaxBandit(Bandit):
    """The same problem with deterministic labels: the oracle prefers the higher true reward (ties: 1/2)."""

    @property
    def oracle_prefs(self) -> torch.Tensor:
        r = self.true_reward
        return (r[:, :, None] > r[:, None, :]).to(r.dtype) + 0.5 * (r[:, :, None] == r[:, None, :]).to(r.dtype)


def argmax_flows(bandit: Bandit, coefs=(0.0, 0.3), steps: int = 10000, lr: float = 0.05) -> dict:
    """Exact flow of online DPO (+ response term) with argmax labels: KL(pi || pi*) (pi* of the Bradley-Terry
    reward) every 5 steps up to 500, then every 50. With deterministic labels DPO has no finite fixed point:
    it over-optimises."""
    argmax = ArgmaxBandit(bandit.true_reward, bandit.ref_logits, bandit.beta)
    record = sorted(set(range(0, 500, 5)) | set(range(0, steps + 1, 50)))
    curves = {"step": record}
    for c in coefs:
        config = SAILConfig(route_dpo=0.0, route_pr=1.0, pr_response_coef=c)
        theta = bandit.ref_logits.clone().requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=lr)
        values = []
        for step in range(steps + 1):
            if step in record:
                values.append(kl(theta.detach(), bandit.optimal_logits).item())
            if step == steps:
                break
            opt.zero_grad()
            theta.grad = field(theta, argmax, config)
            opt.step()
        curves[str(c)] = values
    return curves


COEFS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
"""the coefficient sweep of the fixed points"""
SWEEPS = {
    "gamma (100% online pairs)": lambda c: SAILConfig(route_dpo=0.0, route_pr=1.0, pr_response_coef=c),
    "gamma (SAIL-PR routing, 30% online)": lambda c: SAILConfig.preset("sail-pr", pr_response_coef=c),
    "kappa (SAIL-PP routing, 30% self-labelled)": lambda c: SAILConfig.preset("sail-pp", pp_coef=c),
    "rho (SAIL-DP routing, 40% relabelled)": lambda c: SAILConfig.preset("sail-dp", dp_label_coef=c),
}
PRESETS = {"SAIL-PR": SAILConfig.preset("sail-pr"), "SAIL-PR control (gamma=0)": SAILConfig.preset("sail-pr", pr_response_coef=0.0),
           "SAIL-PP": SAILConfig.preset("sail-pp"), "SAIL-PP control (kappa=0)": SAILConfig.preset("sail-pp", pp_coef=0.0),
           "SAIL-DP": SAILConfig.preset("sail-dp"), "SAIL-DP control (rho=0)": SAILConfig.preset("sail-dp", dp_label_coef=0.0),
           "online DPO": SAILConfig.preset("online-dpo")}


def coverage(problem: dict, ref_scales=(2.0, 0.0)) -> list[dict]:
    """SAIL-PP's fixed point on the same r* with references of different coverage (ref_scale 0: uniform)."""
    out = []
    for scale in ref_scales:
        bandit = make_bandit(**{**problem, "ref_scale": scale})
        ratio = (torch.log_softmax(bandit.optimal_logits, -1) - bandit.log_ref).exp()
        point = fixed_point(bandit, PRESETS["SAIL-PP"])
        out.append({"ref_scale": scale, "max_ratio": ratio.max().item(),
                    "kl_opt_ref": kl(bandit.optimal_logits, bandit.ref_logits).item(), **point})
    return out


DECOMPOSITION_ARMS = {
    "reused, weighted": "the comparison's runs: label rounds reused, response term importance-weighted",
    "reused, unweighted": "the same rounds, response term unweighted (the old harness; SAIL-PR only)",
    "fresh": "fresh oracle-labelled pairs every step: no reuse, but more labels than the budget",
    "4 rounds, weighted": "the budget's labels in 4 rounds of 125 steps (as iterative DPO) instead of 30 of 17",
}
"""The runs of ``decompose_gap``, each for SAIL-PR and its control (same seeds, same datasets)."""


def decompose_gap(setup, seeds: int | None = None) -> dict:
    """SAIL-PR and its control at the headline budget, run the ways of ``DECOMPOSITION_ARMS`` (final
    KL(pi || pi*) per seed; seeds default to the setup's headline seeds): the arms that notebook 02 splits
    SAIL-PR's gap into parts with, each part a paired difference with its own SE. Only "fresh" spends more labels
    than the budget (it isolates sampling noise from the budget); staleness is measured at the budget's labels,
    by moving the same labels into fewer, longer rounds."""
    from .bandit_comparison import BANDIT_METHODS, plan_budget
    from .bandit import route_counts, train_sampled

    bandit = make_bandit(setup.n_prompts, setup.n_responses, setup.beta, setup.ref_scale, setup.problem_seed)
    seeds = seeds or setup.seeds_at(setup.headline_budget)
    runs = {}
    for name in ("SAIL-PR", "SAIL-PR control (gamma=0)"):
        method = BANDIT_METHODS[name]
        plan = plan_budget(method, setup.headline_budget, setup.steps, setup.pairs_per_prompt)
        long_rounds = plan_budget(replace(method, rounds=4), setup.headline_budget, setup.steps, setup.pairs_per_prompt)
        per_step = route_counts(method.config.route_probs, setup.pairs_per_prompt)[3]
        common = dict(n_seeds=seeds, steps=setup.steps, pairs_per_prompt=setup.pairs_per_prompt,
                      lr=setup.lr, eval_every=setup.steps, offline_pairs_per_prompt=plan["offline_pairs"])
        arms = {"reused, weighted": dict(online_pairs_per_prompt=plan["online_pairs"], reuse_steps=plan["reuse_steps"]),
                "reused, unweighted": dict(online_pairs_per_prompt=plan["online_pairs"],
                                           reuse_steps=plan["reuse_steps"], importance_weighting=False),
                "fresh": dict(online_pairs_per_prompt=per_step * setup.steps, reuse_steps=1),
                "4 rounds, weighted": dict(online_pairs_per_prompt=long_rounds["online_pairs"],
                                           reuse_steps=long_rounds["reuse_steps"])}
        for how, kwargs in arms.items():
            if how == "reused, unweighted" and name != "SAIL-PR":
                continue                                  # gamma = 0: no response term to weight
            runs[f"{name}, {how}"] = train_sampled(bandit, method.config, **common, **kwargs)["kl_opt"][-1]
    return {"budget": setup.headline_budget, "seeds": seeds, "arms": DECOMPOSITION_ARMS, "final_kl_opt": runs}


def decomposition_parts(decomposition: dict, fixed_point_bias: float) -> dict:
    """The parts of SAIL-PR's gap to its control from ``decompose_gap``'s runs, each a ``findings.Paired`` of
    per-seed gaps (SAIL-PR minus its control, the same seed): "gap" (as compared), "sampling" (fresh pairs every
    step, minus the exact ``fixed_point_bias``), "label reuse" (as compared minus fresh); gap = bias + sampling +
    label reuse exactly. Beside them, at the same labels: "staleness" (4 rounds minus the comparison's rounds) and
    "unweighted term" (SAIL-PR with the response term unweighted minus weighted)."""
    from .findings import paired

    runs, control = decomposition["final_kl_opt"], "SAIL-PR control (gamma=0)"

    def gaps(how):
        return [a - b for a, b in zip(runs[f"SAIL-PR, {how}"], runs[f"{control}, {how}"])]

    fresh = gaps("fresh")
    return {"gap": paired(runs["SAIL-PR, reused, weighted"], runs[f"{control}, reused, weighted"]),
            "sampling": paired(fresh, [fixed_point_bias] * len(fresh)),
            "label reuse": paired(gaps("reused, weighted"), fresh),
            "staleness": paired(gaps("4 rounds, weighted"), gaps("reused, weighted")),
            "unweighted term": paired(runs["SAIL-PR, reused, unweighted"], runs["SAIL-PR, reused, weighted"])}


def format_decomposition(parts: dict, fixed_point_bias: float) -> str:
    """``decomposition_parts`` as printed by notebook 02 and quoted by the README."""
    rows = [("gap SAIL-PR - control", parts["gap"]), ("  fixed-point bias (exact)", f"{fixed_point_bias:+.3f}"),
            ("  sampling (fresh pairs every step)", parts["sampling"]),
            ("  the budget's label reuse", parts["label reuse"]),
            ("staleness at equal labels (4 vs 30 rounds)", parts["staleness"]),
            ("old unweighted term (unweighted - weighted)", parts["unweighted term"])]
    return "\n".join(f"{name:44s} {value}" for name, value in rows)


PARTS = ("presets", "sweeps", "coverage", "argmax", "decomposition")


def run_part(part: str, setup, progress=print) -> dict:
    """One part of what notebook 02 reads: presets (flow + Newton), coefficient sweeps, two references for
    SAIL-PP, argmax-label flows, or the decomposition of SAIL-PR's finite-sample gap."""
    problem = dict(n_prompts=setup.n_prompts, n_responses=setup.n_responses, beta=setup.beta, seed=setup.problem_seed)
    bandit = make_bandit(**problem, ref_scale=setup.ref_scale)
    if part == "presets":
        out = {}
        for name, config in PRESETS.items():
            out[name] = fixed_point(bandit, config)
            progress(f"preset {name}: KL {out[name]['kl_opt']:.4f} |G| {out[name]['residual']:.1e}")
        return {"problem": {**problem, "ref_scale": setup.ref_scale}, "presets": out}
    if part == "sweeps":
        out = {}
        for name, config_of in SWEEPS.items():
            out[name] = sweep(bandit, config_of, COEFS)
            progress(f"sweep {name}: " + " ".join(f"{p['kl_opt']:.4f} ({p['residual']:.0e})" for p in out[name]))
        return {"sweeps": out}
    if part == "coverage":
        return {"coverage": coverage(problem)}
    if part == "argmax":
        return {"argmax": argmax_flows(bandit)}
    if part == "decomposition":
        return {"decomposition": decompose_gap(setup)}
    raise ValueError(f"part must be one of {PARTS}, got {part!r}")
