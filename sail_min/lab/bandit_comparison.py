"""The bandit comparison at equal oracle-label budgets: offline DPO, online and iterative DPO, the
SAIL variants each beside its control, several seeds.

Used by notebook 02 and by `python -m sail_min bandit`; the larger sweep of the committed results
(``results/bandit/``) is `python -m sail_min bandit --full --out results/bandit`.

**What is equal.** At a budget of B oracle labels per prompt (2 per judged pair: the judge
scores both responses; building the offline dataset costs its labels too), every method

* spends exactly B labels per prompt (``plan_budget``; counted again while training),
* takes the same number of optimiser steps (``steps``), each on ``pairs_per_prompt`` pairs per prompt.

Offline DPO gets a dataset of B/2 pairs per prompt, read in shuffled passes. Online methods get
B/2 oracle-labelled policy pairs per prompt, drawn and labelled in *rounds* and reused for the
round's steps (``reuse_steps`` = steps per round): online DPO uses as many rounds as the budget
allows (each round one fresh batch, at most one round per step), iterative DPO a few large ones.
A method that routes pairs both to the dataset and to oracle-labelled policy pairs (SAIL-PR)
splits B in proportion to its route probabilities; self-labelled pairs cost no labels.

**The harness, as in the LM loop.** The response term's leave-one-out baseline is taken per route
(``objective.baseline_groups``), the public-code term weighs ``public_hook_scale``, and a reused pair's
response term is importance-weighted by pi_theta / pi_old of the pair (``objective.importance_weights``,
clipped at ``IMPORTANCE_CLIP``; each run counts its clipped weights and sums the clip's exact bias on the expected
response term, ``bandit.clip_bias``; points where it exceeds ``CLIP_BIAS_MARK`` are marked). Where each variant's exact expected
update leads, without samples, is ``fixed_points``.

**Scores.** The headline metric is KL(pi || pi*) (lower is better): pi* maximises
E[r*] - beta KL(pi || pi_ref), and KL(pi || pi*) = (V(pi*) - V(pi)) / beta for that value V, so it
is the regret in the objective RLHF optimises. True reward alone can exceed pi*'s (by paying more
KL to pi_ref), so it is shown beside it, not instead.

**Controls.** Each SAIL variant runs beside its control: the same routing and budget with its
extra terms off (SAIL-PR: gamma = 0, i.e. online DPO on 30% of pairs; SAIL-PP: pi = 0, i.e. 30%
self-labelled pairs with no extra term, which carry zero expected gradient; SAIL-DP: rho = 0,
offline DPO with 40% of its pairs relabelled by the policy, again zero expected gradient).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bandit import expected_reward, kl, make_bandit, route_counts, train_sampled
from .findings import THRESHOLD_SE, Paired, difference_of_means, format_paired_table, format_runs_table, mean_sd, paired
from ..config import SAILConfig

FULL_BUDGETS = (16, 64, 256, 1024, 4096)
"""Budgets of the committed sweep (oracle labels per prompt)."""


@dataclass(frozen=True)
class BanditMethod:
    """A method of the comparison: a config (only routing and coefficients matter), how its
    oracle-labelled policy pairs are scheduled, how its self-labelled pairs get a label, and
    the name of its control (a method of the same comparison), if any."""

    config: SAILConfig
    rounds: str | int = "online"
    """"online": as many labelling rounds as the budget allows (each round at least one batch of
    fresh pairs, at most one round per step); an integer: that many rounds (iterative DPO)"""
    control: str | None = None
    """the method whose difference to this one isolates this one's extra terms"""

    def __post_init__(self):
        if not (self.rounds == "online" or (isinstance(self.rounds, int) and self.rounds >= 1)):
            raise ValueError(f"rounds must be 'online' or an integer >= 1, got {self.rounds!r}")


def _m(preset, control=None, rounds="online", **overrides) -> BanditMethod:
    return BanditMethod(SAILConfig.preset(preset, **overrides), rounds, control)


BANDIT_METHODS = {
    "offline DPO": _m("offline-dpo"),
    "online DPO": _m("online-dpo"),
    "iterative DPO (4 rounds)": _m("online-dpo", rounds=4),
    # each SAIL variant, then its control: the same routing and budget, extra terms off
    "SAIL-PR": _m("sail-pr", control="SAIL-PR control (gamma=0)"),
    "SAIL-PR control (gamma=0)": _m("sail-pr", pr_response_coef=0.0),      # = online DPO on 30%
    "SAIL-PR (public-code term)": _m("sail-pr", control="SAIL-PR control (gamma=0)", response_mode="public"),
    "SAIL-PP": _m("sail-pp", control="SAIL-PP control (kappa=0)"),
    "SAIL-PP control (kappa=0)": _m("sail-pp", pp_coef=0.0),
    # label averaged out (the pair, and so the response term, is still sampled)
    "SAIL-PP (label averaged out)": _m("sail-pp", control="SAIL-PP control (kappa=0, label averaged out)",
                                       self_labels="expected"),
    "SAIL-PP control (kappa=0, label averaged out)": _m("sail-pp", self_labels="expected", pp_coef=0.0),
    "SAIL-DP": _m("sail-dp", control="SAIL-DP control (rho=0)"),
    "SAIL-DP control (rho=0)": _m("sail-dp", dp_label_coef=0.0),
    "SAIL-DP (label averaged out)": _m("sail-dp", control="SAIL-DP control (rho=0, label averaged out)",
                                       self_labels="expected"),
    "SAIL-DP control (rho=0, label averaged out)": _m("sail-dp", self_labels="expected", dp_label_coef=0.0),
    # coefficient sweep of the exact response term on top of 100% online DPO (its control)
    "online DPO + response 0.1": _m("online-dpo", control="online DPO", pr_response_coef=0.1),
    "online DPO + response 0.3": _m("online-dpo", control="online DPO", pr_response_coef=0.3),
    "online DPO + response 1.0": _m("online-dpo", control="online DPO", pr_response_coef=1.0),
}


@dataclass
class BanditSetup:
    """The finite-sample, limited-coverage problem of the comparison, and its label budgets."""

    n_prompts: int = 16
    """M, number of prompts"""
    n_responses: int = 12
    """K, responses per prompt"""
    beta: float = 0.3
    """KL coefficient of the lower level"""
    ref_scale: float = 2.0
    """reference logits ~ ref_scale * N(0,1): large = peaked pi_ref, poor coverage of good responses"""
    problem_seed: int = 0
    """seed of r* and pi_ref"""
    budgets: tuple = (1024,)
    """oracle labels per prompt, one comparison each (2 per judged pair, the dataset's included)"""
    headline_budget: int = 1024
    """the budget whose curves are kept and plotted (the last budget if it is not one of them)"""
    pairs_per_prompt: int = 16
    """pairs per prompt per optimiser step, for every method"""
    steps: int = 500
    """Adam steps, the same for every method and budget"""
    lr: float = 0.05
    """Adam learning rate on the logits"""
    n_seeds: int = 5
    """independent runs per method (dataset and samples differ; run s of every method with the
    same dataset size has the same dataset, so differences to a control are paired by seed)"""
    headline_seeds: int | None = None
    """runs per method at the headline budget (default ``n_seeds``): the runs the decomposition of notebook 02
    and the README's headline table rest on"""
    eval_every: int = 25
    """steps between two points of the curves"""
    methods: dict = field(default_factory=lambda: dict(BANDIT_METHODS))
    """name -> BanditMethod (or a SAILConfig: online rounds, sampled labels, no control)"""

    @classmethod
    def full(cls, **changes) -> "BanditSetup":
        """The committed sweep: every budget of ``FULL_BUDGETS``, 20 runs per method, 100 at the headline budget."""
        return cls(**{"budgets": FULL_BUDGETS, "n_seeds": 20, "headline_seeds": 100, **changes})

    def seeds_at(self, budget: int) -> int:
        """Runs per method at ``budget``."""
        return self.headline_seeds if (budget == self.headline_budget and self.headline_seeds) else self.n_seeds


def plan_budget(method: BanditMethod, budget: int, steps: int, pairs_per_prompt: int) -> dict:
    """How a method spends ``budget`` oracle labels per prompt in ``steps`` steps.

    Returns the dataset size and the number of oracle-labelled policy pairs (per prompt), the
    number of labelling rounds and the optimiser steps per round (``reuse_steps``). The labels
    add up to the budget exactly: 2 * (offline_pairs + online_pairs) == budget.
    """
    if not (isinstance(budget, int) and budget >= 2 and budget % 2 == 0):
        raise ValueError(f"a budget is an even number of labels per prompt >= 2, got {budget!r}")
    config = method.config
    pairs = budget // 2
    data_share, online_share = config.route_dpo + config.route_dp, config.route_pr
    if data_share and online_share:
        offline = min(max(round(pairs * data_share / (data_share + online_share)), 1), pairs - 1)
    elif data_share or online_share:
        offline = pairs if data_share else 0
    else:
        raise ValueError("a config with only self-labelled pairs spends no labels")
    online = pairs - offline
    if pairs == 1 and data_share and online_share:
        raise ValueError("a budget of 2 labels cannot feed both the dataset and online pairs")
    reuse_steps, rounds = steps, 0
    if online:
        per_step = route_counts(config.route_probs, pairs_per_prompt)[3]
        if method.rounds == "online":
            target = min(max(online // max(per_step, 1), 1), steps)
        else:
            target = min(method.rounds, online, steps)
        reuse_steps = math.ceil(steps / target)
        rounds = math.ceil(steps / reuse_steps)
    return dict(offline_pairs=offline, online_pairs=online, rounds=rounds, reuse_steps=reuse_steps)


def _changed_fields(config: SAILConfig) -> dict:
    """The fields that differ from SAILConfig's defaults (the routing and coefficients; the bandit
    uses nothing else of a config)."""
    default = SAILConfig().to_dict()
    return {k: v for k, v in config.to_dict().items() if v != default[k]}


def _as_method(value) -> BanditMethod:
    return value if isinstance(value, BanditMethod) else BanditMethod(value)


def run_bandit_comparison(setup: BanditSetup = BanditSetup(), progress=None) -> dict:
    """Train every method of ``setup.methods`` at every budget; return a JSON-ready dict.

    ``results["by_budget"][str(B)][name]``: the plan, labels spent, final numbers (mean, std and
    per seed) at budget B; ``results["methods"]`` the same at the headline budget, with curves.
    """
    bandit = make_bandit(setup.n_prompts, setup.n_responses, setup.beta, setup.ref_scale, setup.problem_seed)
    methods = {name: _as_method(value) for name, value in setup.methods.items()}
    for name, method in methods.items():
        if method.control is not None and method.control not in methods:
            raise ValueError(f"{name}: its control {method.control!r} is not one of the methods")
    headline = setup.headline_budget if setup.headline_budget in setup.budgets else setup.budgets[-1]
    results = {
        "setup": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(setup).items() if k != "methods"},
        "headline_budget": headline,
        "reference_reward": expected_reward(bandit.ref_logits, bandit).item(),
        "optimal_reward": expected_reward(bandit.optimal_logits, bandit).item(),
        "optimal_kl_ref": kl(bandit.optimal_logits, bandit.ref_logits).item(),
        "reference_kl_opt": kl(bandit.ref_logits, bandit.optimal_logits).item(),
        "by_budget": {},
    }
    for budget in setup.budgets:
        block = results["by_budget"][str(budget)] = {}
        for name, method in methods.items():
            plan = plan_budget(method, budget, setup.steps, setup.pairs_per_prompt)
            start = time.perf_counter()
            history = train_sampled(bandit, method.config, n_seeds=setup.seeds_at(budget), steps=setup.steps,
                                    pairs_per_prompt=setup.pairs_per_prompt, lr=setup.lr, eval_every=setup.eval_every,
                                    offline_pairs_per_prompt=plan["offline_pairs"],
                                    online_pairs_per_prompt=plan["online_pairs"], reuse_steps=plan["reuse_steps"])
            per_seed = {key: history[key][-1] for key in ("reward", "kl_ref", "kl_opt")}
            entry = {"config": _changed_fields(method.config), "self_labels": method.config.self_labels, "control": method.control,
                     "plan": plan, "labels_spent": history["labels_per_prompt"],
                     "optimizer_steps": history["optimizer_steps"], "rounds": history["rounds"],
                     "skipped_steps": sum(history["skipped_steps"]), "skipped_per_seed": history["skipped_steps"],
                     "clipped_weights": history["clipped_weights"], "weighted_pair_steps": _weighted_pair_steps(
                         method.config, plan, setup.steps, setup.pairs_per_prompt, setup.n_prompts, setup.seeds_at(budget)),
                     "clip_bias": _clip_bias(history),
                     "final": {key: mean_sd(v) for key, v in per_seed.items()}, "final_per_seed": per_seed,
                     "seconds": time.perf_counter() - start}
            if budget == headline:
                entry["history"] = history
            block[name] = entry
            if progress:
                progress(f"{budget} labels: {name}")
    results["methods"] = results["by_budget"][str(headline)]
    return results


def _weighted_pair_steps(config, plan, steps, pairs_per_prompt, n_prompts, seeds) -> int:
    """How many importance weights a run set computes: reused oracle-labelled pairs x steps x prompts x runs."""
    if plan["reuse_steps"] <= 1 or not plan["online_pairs"]:
        return 0
    return route_counts(config.route_probs, pairs_per_prompt)[3] * steps * n_prompts * seeds


def _clip_bias(history) -> dict | None:
    """The clip's bias on the exact expected response term, relative to the term (``bandit.clip_bias``): summed
    over the run's steps, then over runs (``relative``), and per run (``per_seed``); None without a weighted term."""
    size = history["response_term_size"]
    if not any(size):
        return None
    return {"relative": sum(history["clip_bias"]) / sum(size),
            "per_seed": [b / s for b, s in zip(history["clip_bias"], size)]}


def per_seed(results: dict, name: str, budget=None, key="kl_opt") -> list[float]:
    """Final ``key`` of every run of ``name`` at ``budget`` (default: the headline)."""
    return results["by_budget"][str(budget or results["headline_budget"])][name]["final_per_seed"][key]


def control_difference(results: dict, name: str, budget=None, key="kl_opt") -> Paired:
    """``name`` minus its control in final ``key``, paired by seed (``findings.paired``: difference, SE, n, verdict)."""
    block = results["by_budget"][str(budget or results["headline_budget"])]
    return paired(per_seed(results, name, budget, key), per_seed(results, block[name]["control"], budget, key))


CLIP_BIAS_MARK = 0.10
"""A point whose exact expected response term the clip moves by more than this share of itself is marked."""


def clip_marked(results: dict, name: str, budget) -> bool:
    """Is the clip's bias on ``name``'s response term at ``budget`` above ``CLIP_BIAS_MARK``?"""
    bias = results["by_budget"][str(budget)][name].get("clip_bias")
    return bool(bias) and bias["relative"] > CLIP_BIAS_MARK


def _n_runs(results: dict, budget) -> int:
    return len(next(iter(results["by_budget"][str(budget)].values()))["final_per_seed"]["kl_opt"])


NAME_WIDTH = 46
"""width of the method column of the text tables"""

SKIP_NOTE = ("skip: steps per run skipped because the gradient was not finite (weights and Adam state unchanged). The "
             "public-code term divides by log pi(y), which reaches 0 as the policy collapses onto one response, so its "
             "1/l factor blows up: such a run trains on the remaining steps only")


def format_table(results: dict, budget=None) -> str:
    """A plain-text table per budget: labels spent, the data/online split, rounds, KL(pi || pi*) (the headline),
    true reward and KL(pi || pi_ref) as mean ± SD over runs, steps skipped per run, the clip's bias on the
    response term; then each variant minus its control, paired by seed, with the verdict of ``findings``."""
    budgets = [str(budget)] if budget is not None else list(results["by_budget"])
    setup = results["setup"]
    head = (f"{'method':{NAME_WIDTH}s} {'labels':>6s} {'data+online':>11s} {'rounds x reuse':>14s} {'KL(pi||pi*)':>15s} "
            f"{'true reward':>15s} {'KL(pi||pi_ref)':>15s} {'skip/run':>8s} {'clip bias':>9s}")
    width = len(head)
    lines = []
    for b in budgets:
        n = _n_runs(results, b)
        lines += [f"== {b} oracle labels per prompt, {setup['steps']} optimiser steps of {setup['pairs_per_prompt']} "
                  f"pairs per prompt, {n} runs per method ==", head, "-" * width]
        for name, res in results["by_budget"][b].items():
            cells = [f"{m:6.3f} ± {s:5.3f}" for m, s in (mean_sd(res["final_per_seed"][k]) for k in ("kl_opt", "reward", "kl_ref"))]
            plan = res["plan"]
            split = f"{2 * plan['offline_pairs']}+{2 * plan['online_pairs']}"
            rounds = f"{res['rounds']} x {plan['reuse_steps']}" if res["rounds"] else "-"
            bias = res.get("clip_bias")
            clip = "" if not bias else f"{bias['relative']:.1%}" + ("*" if clip_marked(results, name, b) else "")
            lines.append(f"{name:{NAME_WIDTH}s} {res['labels_spent']:6d} {split:>11s} {rounds:>14s} {cells[0]:>15s} {cells[1]:>15s} "
                         f"{cells[2]:>15s} {res['skipped_steps'] / n:8.1f} {clip:>9s}")
        lines.append("-" * width)
        for key, title in (("kl_opt", "dKL(pi||pi*)"), ("reward", "dreward")):
            comparisons = {f"{name} - control": control_difference(results, name, b, key)
                           for name, res in results["by_budget"][b].items() if res["control"]}
            lines += [format_paired_table(comparisons, title), ""]
    for name, reward, kl_ref, kl_opt in (("pi_ref", results["reference_reward"], 0.0, results["reference_kl_opt"]),
                                         ("pi* (closed form)", results["optimal_reward"], results["optimal_kl_ref"], 0.0)):
        lines.append(f"{name:{NAME_WIDTH}s} KL(pi||pi*) {kl_opt:6.3f}   true reward {reward:6.3f}   KL(pi||pi_ref) {kl_ref:6.3f}")
    lines += [f"(mean ± SD over runs; labels: oracle labels per prompt spent, 2 per judged pair, dataset included; a "
              f"control is the same routing with the extra terms off, listed right below its variant (the response "
              f"sweep's is online DPO); variant - control: paired by seed, ± its SE, verdict at {THRESHOLD_SE:g} SE "
              f"(sail_min.lab.findings); clip bias: the clip's bias on the exact expected response term, relative to "
              f"the term, over the run (bandit.clip_bias); * = above {CLIP_BIAS_MARK:.0%}: the point says more about "
              f"the clip than about the method)", SKIP_NOTE]
    return "\n".join(lines)


def format_summary(results: dict, methods=None, budget=None) -> str:
    """One budget (default: the headline): KL(pi || pi*) and true reward per method (mean, SD, n), then each
    variant minus its control in KL(pi || pi*), paired by seed, with its verdict (``findings``)."""
    budget = str(budget or results["headline_budget"])
    block = results["by_budget"][budget]
    names = methods or list(block)
    kl_table = format_runs_table({name: block[name]["final_per_seed"]["kl_opt"] for name in names}, "KL(pi||pi*)")
    reward_table = format_runs_table({name: block[name]["final_per_seed"]["reward"] for name in names}, "true reward")
    comparisons = {f"{name} - control": control_difference(results, name, budget)
                   for name in names if block[name]["control"]}
    return "\n".join([f"budget {budget} oracle labels per prompt", kl_table, "", reward_table, "",
                      format_paired_table(comparisons, "dKL(pi||pi*)")])


def format_budget_table(results: dict, methods=None, key="kl_opt") -> str:
    """One row per method, one column per budget: mean ± SD of ``key`` over runs (n per budget in the header)."""
    methods = methods or list(results["methods"])
    budgets = list(results["by_budget"])
    label = {"kl_opt": "KL(pi||pi*)", "reward": "true reward", "kl_ref": "KL(pi||pi_ref)"}[key]
    lines = [f"{label + ' at a budget of (labels per prompt)':44s}" + "".join(f"{b:>16s}" for b in budgets),
             f"{'runs per method':44s}" + "".join(f"{_n_runs(results, b):>16d}" for b in budgets)]
    for name in methods:
        cells = [mean_sd(results["by_budget"][b][name]["final_per_seed"][key]) for b in budgets]
        lines.append(f"{name:44s}" + "".join(f"{f'{m:.3f} ± {s:.3f}':>16s}" for m, s in cells))
    return "\n".join(lines)


CONTROL_TABLE_FIRST = ("SAIL-PR", "SAIL-PP", "SAIL-PP (label averaged out)", "SAIL-DP", "SAIL-DP (label averaged out)")
"""The variants ``format_control_table`` lists first."""


def format_control_table(results: dict, names=None, key="kl_opt") -> str:
    """Each variant minus its control in ``key`` at every budget, paired by seed: difference ± SE and the verdict
    of ``findings`` (n per budget in the header); a point the clip biases (``clip_marked``) carries "(clip)"."""
    budgets = list(results["by_budget"])
    if names is None:                        # the SAIL variants first (README quotes them), then the other variants
        variants = [n for n, e in results["methods"].items() if e["control"]]
        names = [n for n in CONTROL_TABLE_FIRST if n in variants] + [n for n in variants if n not in CONTROL_TABLE_FIRST]
    lines = []
    for name in names:
        lines.append(f"{name} - {results['methods'][name]['control']}  ({key}, paired by seed)")
        for b in budgets:
            mark = "  (clip)" if clip_marked(results, name, b) else ""
            lines.append(f"  {b:>5s} labels: {control_difference(results, name, b, key)}{mark}")
    return "\n".join(lines)


def summary_text(results: dict) -> str:
    """What ``python -m sail_min bandit`` prints and ``write_results`` writes to bandit_table.txt: the headline
    summary (``format_summary``, quoted by the README), the table per budget (``format_table``), and with several budgets the KL and reward of each method across budgets and each
    variant minus its control across budgets, every comparison with its computed verdict."""
    parts = [format_summary(results), format_table(results)]
    if len(results["by_budget"]) > 1:
        parts += [format_budget_table(results), format_budget_table(results, key="reward"), format_control_table(results),
                  format_method_comparisons(results)]
    return "\n\n".join(parts) + "\n"


DPO_COMPARISONS = (("online DPO", "offline DPO"), ("iterative DPO (4 rounds)", "offline DPO"),
                   ("iterative DPO (4 rounds)", "online DPO"), ("SAIL-PR control (gamma=0)", "iterative DPO (4 rounds)"))


def format_method_comparisons(results: dict, pairs=DPO_COMPARISONS, key="kl_opt") -> str:
    """Method minus method in ``key`` at every budget but the first (``compare_methods``, unpaired, with verdicts)."""
    budgets = list(results["by_budget"])[1:]
    return "\n".join(f"{a} - {b} at {n} labels: {compare_methods(results, a, b, n, key)}" for a, b in pairs
                     for n in budgets if a in results["by_budget"][n] and b in results["by_budget"][n])


def compare_methods(results: dict, a: str, b: str, budget=None, key="kl_opt") -> Paired:
    """Method ``a`` minus method ``b`` (runs of different methods share only their seed index, not a control's
    dataset: an unpaired ``findings.difference_of_means``)."""
    return difference_of_means(per_seed(results, a, budget, key), per_seed(results, b, budget, key))


PANELS = [("kl_opt", "KL(pi || pi*) (nats, lower is better)"), ("reward", "true reward E[r*] (reward units)"),
          ("kl_ref", "KL(pi || pi_ref) (nats)")]


def curve_groups(results: dict, methods=None) -> list[tuple[str, list[str]]]:
    """Panels of the curve plot: the methods without a control together (the DPO baselines), then each
    control with the variants it controls (<= 5 curves per panel)."""
    methods = methods or list(results["methods"])
    entries = results["methods"]
    controls = [m for m in methods if any(entries[v]["control"] == m for v in methods)]
    plain = [m for m in methods if entries[m]["control"] is None and m not in controls]
    groups = [("DPO baselines", plain)] if plain else []
    for control in controls:
        groups.append((f"vs {control}", [control] + [v for v in methods if entries[v]["control"] == control]))
    return groups


def plot_bandit_comparison(results: dict, methods=None, path=None, key="kl_opt"):
    """KL(pi || pi*) (or ``key``) against the optimiser step at the headline budget, one panel per
    control with its variants (``curve_groups``): mean line, ± SD band over runs."""
    import matplotlib.pyplot as plt

    groups = curve_groups(results, methods)
    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), sharey=True, squeeze=False)
    label = dict(PANELS)[key]
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (title, names) in zip(axes.flat, groups):
        for i, name in enumerate(names):
            hist = results["methods"][name]["history"]
            stats = [mean_sd(v) for v in hist[key]]
            ax.plot(hist["step"], [m for m, _ in stats], color=f"C{i}", ls="--" if i == 0 and title != "DPO baselines"
                    else "-", label=name)
            ax.fill_between(hist["step"], [m - s for m, s in stats], [m + s for m, s in stats], color=f"C{i}", alpha=0.15)
        ax.set_xlabel("optimiser step")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel(label)
    axes[0][0].set_yscale("log" if key == "kl_opt" else "linear")
    fig.suptitle(f"bandit, {results['headline_budget']} oracle labels per prompt: mean over "
                 f"{_n_runs(results, results['headline_budget'])} runs, band = ± 1 SD; each SAIL variant beside its "
                 f"control (dashed)",
                 y=1.03, fontsize=10)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


OFF_SCALE = ("SAIL-PR (public-code term)",)
"""Variants whose difference to the control is tens of times the others': printed beside the dot plot, not on it."""


def plot_control_differences(results: dict, budget=None, ax=None, off_scale=OFF_SCALE):
    """Dot plot: each variant minus its control in final KL(pi || pi*), paired by seed, ± 1 SE. Variants in
    ``off_scale`` would squash the axis: their value is written in the title instead."""
    import matplotlib.pyplot as plt

    budget = str(budget or results["headline_budget"])
    block, n = results["by_budget"][budget], _n_runs(results, budget)
    names = [name for name, res in block.items() if res["control"] and name not in off_scale]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.35 * len(names) + 1))
    stats = [control_difference(results, name, budget) for name in names]
    ax.errorbar([p.difference for p in stats], range(len(names)), xerr=[p.standard_error for p in stats], fmt="o",
                capsize=3, label="variant - control, ± 1 SE")
    ax.axvline(0, color="k", lw=1, label="no difference")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("change in final KL(pi || pi*) vs its control (nats; > 0 = further from pi*)")
    hidden = "; ".join(f"off scale: {name} {control_difference(results, name, budget).difference:+.2f}"
                       for name in off_scale if name in block)
    ax.set_title(f"{budget} oracle labels per prompt, {n} runs each (paired by seed)" + (f"\n{hidden}" if hidden else ""),
                 fontsize=9)
    ax.legend(fontsize=7)
    return ax.figure


def _mark_optimum_and_reference(ax, results):
    """Horizontal lines at the true reward of pi* and of pi_ref."""
    ax.axhline(results["optimal_reward"], color="k", ls="--", lw=1, label="pi* (optimum)")
    ax.axhline(results["reference_reward"], color="gray", ls=":", lw=1, label="pi_ref")


BUDGET_PLOT_METHODS = ["offline DPO", "online DPO", "iterative DPO (4 rounds)"]
CONTROL_PANELS = [("SAIL-PR", ["SAIL-PR", "SAIL-PR (public-code term)"]),
                  ("SAIL-PP", ["SAIL-PP", "SAIL-PP (label averaged out)"]),
                  ("SAIL-DP", ["SAIL-DP", "SAIL-DP (label averaged out)"])]


def _budget_curve(ax, results, name, key, budgets, shift=1.0, **style):
    stats = [results["by_budget"][str(b)][name]["final"][key] for b in budgets]
    ax.errorbar([b * shift for b in budgets], [m for m, _ in stats], yerr=[s for _, s in stats],
                marker="o", ms=4, capsize=2, label=name, **style)


def _budget_axis(ax, budgets):
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("oracle labels per prompt")


def plot_budgets(results: dict, methods=None, path=None):
    """Final numbers against the oracle labels per prompt spent (2 per judged pair, dataset
    included), mean over seeds, error bar +- 1 std. Top: KL(pi || pi*) and true reward of
    ``methods`` (default: offline, online and iterative DPO). Bottom: KL(pi || pi*) of each SAIL
    variant minus its control (paired by seed, error bar +- 1 standard error)."""
    import matplotlib.pyplot as plt

    methods = methods or [m for m in BUDGET_PLOT_METHODS if m in results["methods"]]
    budgets = [int(b) for b in results["by_budget"]]
    fig = plt.figure(figsize=(15, 8.5))
    grid = fig.add_gridspec(2, 6)
    top = [fig.add_subplot(grid[0, :3]), fig.add_subplot(grid[0, 3:])]
    for ax, (key, label) in zip(top, PANELS[:2]):
        for i, name in enumerate(methods):
            _budget_curve(ax, results, name, key, budgets, shift=1.0 + 0.05 * (i - (len(methods) - 1) / 2))
        _budget_axis(ax, budgets)
        ax.set_ylabel(label)
    top[0].set_yscale("log")
    _mark_optimum_and_reference(top[1], results)
    top[0].legend(fontsize=8)
    top[1].legend(fontsize=8)
    for col, (title, variants) in enumerate(CONTROL_PANELS):
        variants = [v for v in variants if v in results["methods"]]
        if not variants:
            continue
        ax = fig.add_subplot(grid[1, 2 * col: 2 * col + 2])
        for i, name in enumerate(variants):
            stats = [control_difference(results, name, b) for b in budgets]
            ax.errorbar([b * (1.0 + 0.06 * (i - 0.5)) for b in budgets], [p.difference for p in stats],
                        yerr=[p.standard_error for p in stats], marker="o", ms=4, capsize=2, color=f"C{3 + i}",
                        label=f"{name} - its control")
        ax.axhline(0, color="k", lw=1, label="no difference")
        _budget_axis(ax, budgets)
        ax.set_ylabel("change in KL(pi || pi*) vs control (nats)")
        ax.set_title(f"{title}: variant - control, paired by seed, +- 1 SE", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"bandit at equal label budgets: every method spends the budget in {results['setup']['steps']} "
                 f"optimiser steps; mean ± SD over runs ({', '.join(str(_n_runs(results, b)) for b in budgets)} "
                 f"per budget)", y=1.0)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def _rounded(value):
    """Floats to 6 significant digits, so the JSON stays small and readable."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def write_results(results: dict, out: str | Path) -> tuple[Path, Path]:
    """Write bandit_results.json, bandit_table.txt (``summary_text``) and bandit_comparison.png (curves at the
    headline budget) to ``out``; with several budgets also bandit_budgets.png. Returns the json and png paths."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "bandit_results.json", out / "bandit_comparison.png"
    # "methods" (the headline budget, with curves) is a view of one block of "by_budget": written once
    # with its curves, and in "by_budget" without them
    by_budget = {b: {name: {k: v for k, v in entry.items() if k != "history"} for name, entry in block.items()}
                 for b, block in results["by_budget"].items()}
    text = json.dumps(_rounded({**results, "by_budget": by_budget}), indent=1)
    # a list of numbers on one line (curves and per-seed values): a readable file a third of the size
    text = re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    json_path.write_text(text)
    (out / "bandit_table.txt").write_text(summary_text(read_results(json_path)))   # the numbers as stored
    plt.close(plot_bandit_comparison(results, path=png_path))
    if len(results["by_budget"]) > 1:
        plt.close(plot_budgets(results, path=out / "bandit_budgets.png"))
    return json_path, png_path


def read_results(path: str | Path) -> dict:
    """Read what ``write_results`` wrote (the headline budget's block of ``by_budget`` is ``methods``)."""
    results = json.loads(Path(path).read_text())
    results["by_budget"][str(results["headline_budget"])] = results["methods"]
    return results
