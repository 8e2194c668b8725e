"""The experiments on the toy sentiment task: the main job (every method beside its control, equal judge
budgets), the --full sweeps (learning rates, betas, judge budgets). ``python -m sail_min`` runs them;
the task itself (model, data, judge, its budget rule) is ``sail_min.lab.sentiment``.
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import torch

from .compare import run_comparison
from ..config import SAILConfig
from .sentiment import load_base_model, sentiment_task, task_for_method

METHODS = [
    "offline-dpo", "online-dpo", "iterative-dpo",
    "sail-pr", ("sail-pr-control", "sail-pr", {"pr_response_coef": 0.0}),      # online DPO on its 30% of pairs
    ("sail-pr-public-hook", "sail-pr", {"response_mode": "public"}),          # the public code's term, at its scale
    "sail-pp", ("sail-pp-control", "sail-pp", {"pp_coef": 0.0}),              # self-labelled pairs, no extra terms
    "sail-dp", ("sail-dp-control", "sail-dp", {"dp_label_coef": 0.0}),        # relabelled dataset pairs, no term
]
"""The main job's methods: each SAIL variant beside its control (the same routing, extra terms off)."""
QUICK = dict(steps=6, pairs_per_step=8, eval_every=3, eval_prompts=16)
"""The CI-sized main job (2 seeds): the same code path, smaller numbers."""
FULL = dict(lrs=(2.5e-4, 5e-4, 1e-3), betas=(0.05, 0.2))
"""--full: a learning-rate grid (each method reported at its best) and a beta sweep for the frontier."""


def main_job(out: str | Path, seeds: int = 5, quick: bool = False, resume: bool = False, progress: bool = True,
             overrides: dict | None = None, methods: list | None = None, overwrite: bool = False):
    """Every method of ``methods`` (default ``METHODS``) on this task: the same steps and pairs per step,
    equal judge budgets.

    Judge queries in the table count the dataset's construction (2 per dataset pair read) plus the
    loop's judge labels. Returns the results dict of ``sail_min.lab.compare.run_comparison``."""
    torch.set_num_threads(1)            # a 0.35 M-parameter model: one thread is fastest
    results = run_comparison(methods or METHODS, seeds, out, sentiment_task(), load_base_model,
                             overrides={**(QUICK if quick else {}), **(overrides or {})}, task_for=task_for_method,
                             resume=resume, progress=progress, overwrite=overwrite)
    for method in results["methods"].values():
        reads_dataset = method["config"]["route_dpo"] + method["config"]["route_dp"] > 0
        for run in method["runs"]:
            run["judge_queries"] = run["judge_labels"] + (2 * run["dataset_pairs"] if reads_dataset else 0)
    return results


BUDGETS = (112, 224, 336, 672)
"""--full: judge-labelled pairs per run (2 judge queries each) for the budget sweep; each divides 42 steps x 16 pairs."""


def budget_job(out: str | Path, seeds: int = 5, progress: bool = True, overwrite: bool = False) -> dict:
    """Offline and online DPO at each judge budget of ``BUDGETS`` (pairs), the same 42 steps of 16 pairs each:
    offline DPO reads the first B dataset pairs in shuffled passes; online DPO labels B pairs in rounds of 16
    and trains ``672 / B`` steps on each round (``reuse_steps``: iterative DPO when above 1)."""
    torch.set_num_threads(1)
    task, results = sentiment_task(), {}
    for budget in BUDGETS:
        reuse = (42 * 16) // budget
        methods = ["offline-dpo", (f"online-dpo (x{reuse} reuse)", "online-dpo", {"reuse_steps": reuse})]
        results[f"{budget} pairs"] = run_comparison(
            methods, seeds, Path(out) / f"budget{budget}", task, load_base_model,
            overrides={"checkpoint_every": 42}, progress=progress, overwrite=overwrite,
            task_for=lambda t, config, b=budget: dataclasses.replace(t, preferences=t.preferences[:b]))
        for method in results[f"{budget} pairs"]["methods"].values():
            for run in method["runs"]:
                run["judge_queries"] = run["judge_labels"] + 2 * (run["dataset_pairs"]
                                                                  if method["config"]["route_dpo"] > 0 else 0)
    return results


def full_job(out: str | Path, seeds: int = 5, progress: bool = True, overwrite: bool = False) -> dict:
    """``main_job`` at every learning rate of ``FULL["lrs"]`` (each method reported at the lr of its best
    mean final judge reward) and at every beta of ``FULL["betas"]`` (the reward-KL frontier), and
    ``budget_job`` (offline vs online DPO at several judge budgets)."""
    out = Path(out)
    runs = {f"lr={lr:g}": main_job(out / f"lr{lr:g}", seeds, progress=progress, overrides={"lr": lr}, overwrite=overwrite)
            for lr in FULL["lrs"]}
    best = {"methods": {}, "seeds": seeds, "overrides": {}}
    for name in runs[next(iter(runs))]["methods"]:
        key = max(runs, key=lambda k: statistics.fmean(r["judge_reward"] for r in runs[k]["methods"][name]["runs"]))
        best["methods"][f"{name} ({key})"] = runs[key]["methods"][name]
    best["base_judge_reward"] = runs[next(iter(runs))]["base_judge_reward"]
    betas = {f"beta={beta:g}": main_job(out / f"beta{beta:g}", seeds, progress=progress, overrides={"beta": beta},
                                        overwrite=overwrite)
             for beta in FULL["betas"]}
    default = SAILConfig()                         # the lr grid's run at the default lr is the default beta's
    return {"best_lr": best, "by_lr": runs, "by_beta": {**betas, f"beta={default.beta:g}": runs[f"lr={default.lr:g}"]},
            "by_budget": budget_job(out, seeds, progress, overwrite)}
