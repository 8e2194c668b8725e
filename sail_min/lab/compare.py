"""Compare methods on one task: every method, every seed, the same task, one table and one plot.

A method is a preset name, or ``(label, preset, overrides)``; ``overrides`` (SAILConfig fields)
apply to every method, and the seed is the run's index. Nothing here knows a particular task:
a task's own rules (the toy task's equal judge budget, its axis label) come in through
``task_for`` and ``reward_label`` (see ``sail_min.lab.experiments.main_job``). Judge labels counted
are the calls the loop made (2 per judge-labelled pair); dataset labels are not judge calls.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import SAILConfig
from ..train import Task, train


def mean_std(values) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def method_name(method) -> tuple[str, str, dict]:
    """(label, preset, overrides) of a method given as a preset name or as that triple."""
    return (method, method, {}) if isinstance(method, str) else tuple(method)


def run_comparison(methods: Sequence, seeds: int, out: str | Path, task: Task, load_policy: Callable,
                   overrides: dict | None = None, task_for: Callable | None = None, resume: bool = False,
                   progress: bool = True, overwrite: bool = False) -> dict:
    """Train every method for seeds 0..seeds-1; write per-run metrics under ``out/label/seedN``.

    ``load_policy()`` returns a fresh ``(model, tokenizer)`` for each run. ``task_for(task, config)``
    (optional) gives the task a run sees, e.g. a trimmed dataset. ``resume=True`` continues every run
    from its checkpoint (a finished run is read back from its metrics), so an interrupted comparison
    loses at most ``checkpoint_every`` steps a run. A run folder that already holds a run is refused
    (``train.OutputExistsError``) unless ``resume`` or ``overwrite`` (its runs are trained again from step 0).
    """
    out = Path(out)
    results = {"overrides": dict(overrides or {}), "seeds": seeds, "methods": {}}
    for method in methods:
        label, preset, method_overrides = method_name(method)
        runs = []
        for seed in range(seeds):
            config = SAILConfig.preset(preset, **{**(overrides or {}), **method_overrides, "seed": seed,
                                                  "output_dir": str(out / label / f"seed{seed}")})
            run_task = task_for(task, config) if task_for else task
            policy, tokenizer = load_policy()
            start = time.perf_counter()
            history = train(config, policy, tokenizer, run_task, resume=resume, overwrite=overwrite, progress=progress)
            seconds = time.perf_counter() - start
            del policy                                    # free it (and its compiled graphs) before the next
            runs.append(summarise_run(history, seed, seconds, run_task, where=config.output_dir))
        results["methods"][label] = {"config": config.to_dict(), "runs": runs}
    # the reference (= base) policy's samples, which every win rate is measured against
    first_runs = next(iter(results["methods"].values()))["runs"]
    results["base_judge_reward"] = statistics.fmean(r["reference_judge_reward"] for r in first_runs)
    return results


class IncompleteRun(ValueError):
    """A run folder whose metrics end without a final evaluation (e.g. metrics.jsonl deleted)."""


def summarise_run(history: list[dict], seed: int, seconds: float, task: Task, where: str = "") -> dict:
    """The numbers of one run that the table and the plots use."""
    if not history or "eval/judge_reward" not in history[-1]:
        raise IncompleteRun(f"{where or f'run of seed {seed}'}: its metrics.jsonl has no final evaluation; "
                            "delete the run's folder to train it again")
    final = history[-1]
    return {"seed": seed, "seconds": seconds, "judge_reward": final["eval/judge_reward"],
            "win_rate": final["eval/win_rate"], "reference_judge_reward": final["eval/reference_judge_reward"],
            "kl": final["eval/kl"], "response_length": final["eval/response_length"],
            "judge_labels": final["judge_queries"], "dataset_pairs": len(task.preferences),
            "skipped_steps": final["skipped_steps"],
            "curve": [(h["step"] + 1, h["eval/judge_reward"], h["eval/kl"]) for h in history if "eval/judge_reward" in h]}


def reward_at_kl(run: dict, kl: float) -> float | None:
    """The run's judge reward where its trajectory first reaches KL(pi || pi_base) = kl, by linear
    interpolation between evaluations (the start is the base policy: KL 0, the reference's reward);
    None if it never gets there."""
    points = [(0.0, run["reference_judge_reward"])] + [(k, r) for _, r, k in run["curve"]]
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k0 <= kl <= k1 and k1 > k0:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0)
    return None


def matched_kl(results: dict) -> float:
    """Where the frontier is compared: the smallest of the methods' mean final KL to the base, a KL every
    method reaches on average (a run that stops short of it gets no reward there, and is counted out)."""
    return min(statistics.fmean(r["kl"] for r in m["runs"]) for m in results["methods"].values())


def format_table(results: dict, labels_column: str = "judge_labels", labels_title: str = "judge labels") -> str:
    """judge reward, win rate vs base, KL to base (mean +- std over seeds), judge reward at one matched KL
    (the frontier: ``matched_kl``), labels spent, wall time."""
    methods = results["methods"]
    kl_star = matched_kl(results)
    base_time = statistics.fmean(r["seconds"] for r in next(iter(methods.values()))["runs"])
    hide_times = os.environ.get("SAIL_HIDE_TIMINGS") == "1"      # set by the tests: times vary by machine
    head = (f"{'method':26s} {'judge reward':>15s} {'win rate vs base':>17s} {'KL to base':>14s} "
            f"{f'reward@KL={kl_star:.2f}':>16s} {labels_title:>13s} {'wall s':>7s} {'x first':>7s}")
    lines = [head, "-" * len(head)]
    for name, m in methods.items():
        runs = m["runs"]
        cells = [mean_std(r[key] for r in runs) for key in ("judge_reward", "win_rate", "kl")]
        seconds = statistics.fmean(r["seconds"] for r in runs)
        labels = statistics.fmean(r[labels_column] for r in runs)
        matched = [v for v in (reward_at_kl(r, kl_star) for r in runs) if v is not None]
        at_kl = f"{statistics.fmean(matched):7.3f} ({len(matched)}/{len(runs)})" if matched else f"{'-':>13s}"
        lines.append(f"{name:26s} {cells[0][0]:7.3f} +- {cells[0][1]:.3f} {cells[1][0]:8.3f} +- {cells[1][1]:.3f} "
                     f"{cells[2][0]:6.2f} +- {cells[2][1]:.2f} {at_kl:>16s} {labels:13.0f} "
                     + (f"{'-':>7s} {'-':>7s}" if hide_times else f"{seconds:7.1f} {seconds / base_time:7.2f}"))
    lines.append("-" * len(head))
    n = len(next(iter(methods.values()))["runs"])
    lines.append(f"base policy judge reward {results['base_judge_reward']:.3f}; mean +- std over {n} seeds; "
                 f"reward@KL: mean over the runs (count) that reach that KL; 'x first' = wall time / first method's")
    return "\n".join(lines)


def comparison_panels(names: Sequence[str]) -> dict[str, list[str]]:
    """The panels of ``plot_comparison``: the baselines, then one panel per SAIL variant beside its control.

    A method ``X-control`` is the control of ``X`` and of every ``X-...`` (``sail-pr-public-hook``); a label
    suffix `` (...)`` such as `` (lr=0.001)`` is ignored. Methods without a control go to "baselines"."""
    def bare(name):
        return name.split(" (")[0]
    variants = [bare(n)[: -len("-control")] for n in names if bare(n).endswith("-control")]
    panels, placed = {}, set()
    for variant in variants:
        members = [n for n in names if bare(n) == variant or bare(n).startswith(variant + "-")]
        panels[f"{variant} beside its control"] = members
        placed.update(members)
    baselines = [n for n in names if n not in placed]
    return ({"baselines": baselines} if baselines else {}) | panels


def plot_comparison(results: dict, reward_label: str = "judge reward", path=None, panels: dict | None = None,
                    controls: Sequence[str] = (), reference_lines: dict | None = None):
    """Small multiples, one column per panel (default ``comparison_panels``: baselines, then each SAIL
    variant beside its control); top: judge reward vs step (mean +- std over seeds); bottom: judge reward
    vs KL to the base along training (mean trajectory; dots: each seed's end, the large dot their mean).

    A method keeps its colour in every panel; controls (names ending in ``-control``, and ``controls``) are
    dashed. ``reference_lines`` {label: reward} adds labelled horizontal lines (the base policy's is always
    drawn), which also give the y-axis a scale when the methods barely move."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = results["methods"]
    panels = panels or comparison_panels(list(methods))
    colors = {name: f"C{i % 10}" for i, name in enumerate(methods)}
    dashed = set(controls) | {n for n in methods if n.split(" (")[0].endswith("-control")}
    base = results["base_judge_reward"]
    lines = {"base policy": base, **(reference_lines or {})}
    fig, axes = plt.subplots(2, len(panels), figsize=(4.3 * len(panels) + 1, 7.2), sharey=True, squeeze=False)
    for column, (title, names) in enumerate(panels.items()):
        ax_curve, ax_front = axes[0, column], axes[1, column]
        for name in names:
            runs, style = methods[name]["runs"], dict(color=colors[name], ls="--" if name in dashed else "-")
            curves = [r["curve"] for r in runs]
            points = range(min(len(c) for c in curves))
            steps = [curves[0][j][0] for j in points]
            stats = [mean_std(c[j][1] for c in curves) for j in points]
            ax_curve.plot([0] + steps, [base] + [m for m, _ in stats], label=name, **style)
            ax_curve.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], color=colors[name],
                                  alpha=0.12)
            mean_kl = [0.0] + [statistics.fmean(c[j][2] for c in curves) for j in points]
            ax_front.plot(mean_kl, [base] + [m for m, _ in stats], alpha=0.8, label=name, **style)
            kls, rewards = [r["kl"] for r in runs], [r["judge_reward"] for r in runs]
            ax_front.scatter(kls, rewards, color=colors[name], alpha=0.35, s=16)
            ax_front.scatter([statistics.fmean(kls)], [statistics.fmean(rewards)], color=colors[name], s=70,
                             edgecolor="k", zorder=3)
        for ax in (ax_curve, ax_front):
            for i, (label, value) in enumerate(lines.items()):     # the base: grey dots; others: black dash-dots
                ax.axhline(value, color="0.55" if i == 0 else "k", lw=0.9,
                           ls=":" if i == 0 else ("-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 1)))[(i - 1) % 3], label=label)
            ax.xaxis.set_major_locator(MaxNLocator(6))
            ax.legend(fontsize=7)
        ax_curve.set_title(title)
        ax_curve.set_xlabel("training step")
        ax_front.set_xlabel("KL(pi || pi_base), held-out prompts (nats)")
    axes[0, 0].set_ylabel(f"{reward_label}\nmean +- std over seeds")
    axes[1, 0].set_ylabel(f"{reward_label}\nalong training; dots: each seed's end")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def plot_frontier(by_beta: dict, reward_label: str = "judge reward", path=None) -> Path | None:
    """Judge reward vs KL to the base at the end of training, one point per beta (mean over seeds),
    connected per method: the reward-KL frontier each method traces as beta varies."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    betas = sorted(by_beta, key=lambda name: float(name.split("=")[1]))
    methods = list(by_beta[betas[0]]["methods"])
    for i, method in enumerate(methods):
        points = [(statistics.fmean(r["kl"] for r in by_beta[b]["methods"][method]["runs"]),
                   statistics.fmean(r["judge_reward"] for r in by_beta[b]["methods"][method]["runs"])) for b in betas]
        ax.plot(*zip(*points), "o-", color=f"C{i % 10}", label=method)
    ax.set_xlabel("KL(pi || pi_base) on held-out prompts (nats per response)")
    ax.set_ylabel(reward_label)
    ax.set_title(f"reward-KL frontier over {', '.join(betas)} (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)
    return None


def write_results(results: dict, out: str | Path, reward_label: str = "judge reward") -> list[Path]:
    """results.json and comparison.png in ``out``."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "results.json", out / "comparison.png"
    json_path.write_text(json.dumps(results, indent=1))
    plt.close(plot_comparison(results, reward_label, png_path))
    return [json_path, png_path]
