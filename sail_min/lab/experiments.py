"""The experiments on the toy sentiment task: the main job (every method beside its control, equal judge
budgets), the --full sweeps (learning rates, betas, judge budgets), and their printed summaries (every
comparison paired by seed, with the verdict of ``sail_min.lab.findings``). ``python -m sail_min`` runs them;
the task itself (model, data, judge, its budget rule) is ``sail_min.lab.sentiment``.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import torch

from .compare import format_table, run_comparison
from ..config import SAILConfig
from .sentiment import (DATASET_JUDGE_QUERIES_PER_PAIR, judge_budget, load_base_model, sentiment_task,
                        task_for_method)

METHODS = [
    "offline-dpo", "online-dpo", "iterative-dpo",
    "sail-pr", ("sail-pr-control", "sail-pr", {"pr_response_coef": 0.0}),      # online DPO on its 30% of pairs
    ("sail-pr-public-hook", "sail-pr", {"response_mode": "public"}),          # the public code's term, at its scale
    "sail-pp", ("sail-pp-control", "sail-pp", {"pp_coef": 0.0}),              # self-labelled pairs, no extra terms
    "sail-dp", ("sail-dp-control", "sail-dp", {"dp_label_coef": 0.0}),        # relabelled dataset pairs, no term
]
"""The main job's methods: each SAIL variant beside its control (the same routing, extra terms off)."""
EQUAL_BUDGET = [("online-dpo", "offline-dpo")]
"""Comparisons at an equal judge budget beside the variant-vs-control ones (bare method names)."""
QUICK = dict(steps=6, pairs_per_step=8, eval_every=3, eval_prompts=16)
"""The CI-sized main job (2 seeds): the same code path, smaller numbers."""
FULL = dict(lrs=(2.5e-4, 5e-4, 1e-3), betas=(0.05, 0.2))
"""--full: a learning-rate grid (each method reported at its best) and a beta sweep for the frontier."""
BUDGET_NOTE = (f"judge budget = the loop's judge queries (2 per pair the judge labels) + {DATASET_JUDGE_QUERIES_PER_PAIR} "
               "per dataset pair the run can read (the dataset's construction); equal in expectation across methods "
               "except iterative DPO (one labelled round per reuse_steps steps)")


def add_judge_budgets(results: dict) -> dict:
    """Each run's ``judge_budget`` (``sentiment.judge_budget``: the loop's judge queries + the dataset pairs it
    reads), in place; returns ``results``."""
    for method in results["methods"].values():
        config = SAILConfig.from_dict(method["config"])
        for run in method["runs"]:
            run["judge_budget"] = judge_budget(config, run["judge_queries"], run["dataset_pairs"])
    return results


def main_job(out: str | Path, seeds: int = 5, quick: bool = False, resume: bool = False, progress: bool = True,
             overrides: dict | None = None, methods: list | None = None, task_for=task_for_method,
             overwrite: bool = False):
    """Every method of ``methods`` (default ``METHODS``) on this task: the same steps and pairs per step,
    equal expected judge budgets (``sentiment.task_for_method``). Returns the results dict of
    ``sail_min.lab.compare.run_comparison``, each run with its ``judge_budget``."""
    torch.set_num_threads(1)            # a 0.35 M-parameter model: one thread is fastest
    results = run_comparison(methods or METHODS, seeds, out, sentiment_task(), load_base_model,
                             overrides={**(QUICK if quick else {}), **(overrides or {})}, task_for=task_for,
                             resume=resume, progress=progress, overwrite=overwrite)
    return add_judge_budgets(results)


def report(results: dict) -> str:
    """The main job's printout: the table of ``compare.format_table`` with each run's judge budget, then every
    variant minus its control and online minus offline DPO, paired by seed, each with its computed verdict."""
    return format_table(results, budget_key="judge_budget", budget_title="judge budget", extra=EQUAL_BUDGET,
                        budget_note=BUDGET_NOTE)


BUDGETS = (112, 224, 336, 672)
"""--full: judge-labelled pairs per run (2 judge queries each) for the budget sweep; each divides the default
run's steps x pairs per step (42 x 16 = 672 pairs)."""


def budget_job(out: str | Path, seeds: int = 5, progress: bool = True, overwrite: bool = False) -> dict:
    """Offline and online DPO at each judge budget of ``BUDGETS`` (pairs), in the default run's steps of
    ``pairs_per_step`` pairs: offline DPO reads the first B dataset pairs in shuffled passes; online DPO labels
    B pairs in rounds of ``pairs_per_step`` and trains ``steps x pairs_per_step / B`` steps on each round
    (``reuse_steps``: iterative DPO when above 1)."""
    torch.set_num_threads(1)
    task, results, default = sentiment_task(), {}, SAILConfig()
    pairs_per_run = default.steps * default.pairs_per_step
    for budget in BUDGETS:
        if pairs_per_run % budget:
            raise ValueError(f"a judge budget of {budget} pairs does not divide {pairs_per_run} = steps x pairs_per_step")
        reuse = pairs_per_run // budget
        methods = ["offline-dpo", (f"online-dpo (x{reuse} reuse)", "online-dpo", {"reuse_steps": reuse})]
        results[f"{budget} pairs"] = add_judge_budgets(run_comparison(
            methods, seeds, Path(out) / f"budget{budget}", task, load_base_model,
            overrides={"checkpoint_every": default.steps}, progress=progress, overwrite=overwrite,
            task_for=lambda t, config, b=budget: dataclasses.replace(t, preferences=t.preferences[:b])))
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


def full_report(full: dict) -> str:
    """--full's printout: ``report`` of each method at its best learning rate, of each beta, of each judge budget."""
    default = SAILConfig()
    lrs = ", ".join(name.split("=")[1] for name in full["by_lr"])
    sections = [(f"each method at its best learning rate (of {lrs}; chosen on the same seeds, so its lead over "
                 "the others is biased upwards):", full["best_lr"])]
    sections += [(f"lr {default.lr:g}, {name}:", results) for name, results in full["by_beta"].items()]
    sections += [(f"judge budget {name} ({default.steps} steps x {default.pairs_per_step} pairs; online DPO trains "
                  "several steps on each labelled round):", results) for name, results in full["by_budget"].items()]
    return "\n\n".join(f"{title}\n{report(results)}" for title, results in sections)


def write_summaries(root: str | Path) -> Path:
    """``root/toy_tables.txt`` from ``root/results.json`` (the main job) and ``root/results_full.json``
    (--full): the printouts of ``report`` and ``full_report``, regenerated without training."""
    root = Path(root)
    main = json.loads((root / "results.json").read_text())
    full = json.loads((root / "results_full.json").read_text())
    counts = {name: len(m["runs"]) for name, m in main["methods"].items()}
    fewer = {name: n for name, n in counts.items() if n < max(counts.values())}
    text = (f"main job (default settings, `python -m sail_min --seeds {max(counts.values())}`; "
            f"{max(counts.values())} seeds per method" + (f", {fewer}" if fewer else "") + f"):\n{report(main)}\n\n"
            f"--full ({full['best_lr']['seeds']} seeds each):\n\n{full_report(full)}\n")
    path = root / "toy_tables.txt"
    path.write_text(text)
    return path


README_NAMES = {"offline-dpo": "offline DPO (shuffled passes over the dataset)", "online-dpo": "online DPO",
                "iterative-dpo": "iterative DPO (4 steps per labelled round)",
                "sail-pr": "SAIL-PR (public defaults, gamma = 0.3)", "sail-pr-control": "its control (gamma = 0)",
                "sail-pr-public-hook": "the public code's term at its scale (x8, argmax labels)",
                "sail-pp": "SAIL-PP (pp_coef = 0.2)", "sail-pp-control": "its control (pp_coef = 0)",
                "sail-dp": "SAIL-DP (rho = 0.2)", "sail-dp-control": "its control (rho = 0)"}


def markdown_report(results: dict) -> str:
    """The README's toy tables, generated: per method mean +- SD, reward at the matched KL, judge budget and n;
    then each paired comparison with its SE, n and verdict (``findings.paired``)."""
    from .compare import MIN_PAIRED_SEEDS, comparisons, matched_kl, reward_at_kl
    from .findings import mean_sd

    kl_star = matched_kl(results)
    rows = [f"| method | final judge reward | KL to base (nats) | reward @ KL {kl_star:.2f} (runs reaching it) "
            "| judge budget | n |", "|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        runs = m["runs"]
        (reward, sd_reward), (kl, sd_kl) = mean_sd([r["judge_reward"] for r in runs]), mean_sd([r["kl"] for r in runs])
        matched = [v for v in (reward_at_kl(r, kl_star) for r in runs) if v is not None]
        at_kl = f"{statistics.fmean(matched):.3f} ({len(matched)}/{len(runs)})" if matched else "-"
        budget = statistics.fmean(r["judge_budget"] for r in runs)
        rows.append(f"| {README_NAMES.get(name, name)} | {reward:.3f} ± {sd_reward:.3f} | {kl:.2f} ± {sd_kl:.2f} "
                    f"| {at_kl} | {budget:.0f} | {len(runs)} |")
    rows.append(f"| base policy (its own samples, the win-rate baseline) | {results['base_judge_reward']:.3f} | 0 | | | |")
    found = comparisons(results, EQUAL_BUDGET)
    rows += ["", "| A − B, paired by seed | final judge reward: A − B ± SE (n) | verdict | at the pair's matched KL: "
             "A − B ± SE (n) | verdict |", "|---|---|---|---|---|"]
    for name, p in found["final"].items():
        at = {k: v for k, v in (found["matched_kl"] | found["too_few"]).items() if k.startswith(name + " at KL ")}
        (where, q), = at.items()
        kl = where[len(name) + len(" at KL "):]
        at_kl = (f"KL {kl}: {q.difference:+.3f} ± {q.standard_error:.3f} ({q.n}) | {q.verdict}" if not isinstance(q, int)
                 else f"KL {kl}: {q} seeds reach it | no verdict (fewer than {MIN_PAIRED_SEEDS} paired seeds)")
        rows.append(f"| {name} | {p.difference:+.3f} ± {p.standard_error:.3f} ({p.n}) | {p.verdict} | {at_kl} |")
    return "\n".join(rows)


def markdown_sweep_report(full: dict) -> str:
    """The README's summary of --full, generated: per setting (best learning rate, each beta, each judge budget), the
    final judge reward of online minus offline DPO and of each variant minus its control, paired by seed, with SE,
    n and verdict (``compare.comparisons``)."""
    from .compare import bare_name, comparisons

    columns = ["online-dpo - offline-dpo", "sail-pr - sail-pr-control", "sail-pr-public-hook - sail-pr-control",
               "sail-pp - sail-pp-control", "sail-dp - sail-dp-control"]
    settings = [("each method at its best lr", full["best_lr"])] + list(full["by_beta"].items()) + [
        (f"judge budget {name}", results) for name, results in full["by_budget"].items()]
    rows = ["| setting | " + " | ".join(c.replace(" - ", " − ") for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for title, results in settings:
        found = {" - ".join(bare_name(part) for part in name.split(" - ")): p
                 for name, p in comparisons(results, EQUAL_BUDGET)["final"].items()}
        cells = [f"{found[c].difference:+.3f} ± {found[c].standard_error:.3f} (n={found[c].n}): {found[c].verdict}"
                 if c in found else "" for c in columns]
        rows.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
