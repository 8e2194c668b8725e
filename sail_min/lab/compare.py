"""Compare methods on one task: every method, every seed, the same task, one table and one plot.

A method is a preset name, or ``(label, preset, overrides)``; ``overrides`` (SAILConfig fields)
apply to every method, and the seed is the run's index. Nothing here knows a particular task:
a task's own rules (the toy task's equal judge budget, its axis label) come in through
``task_for`` and ``reward_label`` (see ``sail_min.lab.experiments.main_job``). ``judge_queries`` of a run is
the loop's metric of that name: responses the judge scored, 2 per judge-labelled pair (a task may add what its
dataset cost, as ``judge_budget``: the toy task's ``sentiment.judge_budget``).

Every comparison is paired by seed (method A's seed s against method B's seed s: the same prompts, routes and
data order) and printed with the verdict of ``sail_min.lab.findings.paired``.
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
from .findings import THRESHOLD_SE, Paired, format_paired_table, mean_sd, paired


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
    for seed in range(seeds):                   # seeds outer: an interrupted comparison has every method's first seeds
        for method in methods:
            label, preset, method_overrides = method_name(method)
            config = SAILConfig.preset(preset, **{**(overrides or {}), **method_overrides, "seed": seed,
                                                  "output_dir": str(out / label / f"seed{seed}")})
            run_task = task_for(task, config) if task_for else task
            policy, tokenizer = load_policy()
            start = time.perf_counter()
            history = train(config, policy, tokenizer, run_task, resume=resume, overwrite=overwrite, progress=progress)
            seconds = time.perf_counter() - start
            del policy                                    # free it (and its compiled graphs) before the next
            entry = results["methods"].setdefault(label, {"config": None, "runs": []})
            entry["config"] = config.to_dict()
            entry["runs"].append(summarise_run(history, seed, seconds, run_task, where=config.output_dir))
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
            "judge_queries": final["judge_queries"], "dataset_pairs": len(task.preferences),
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
    """Where the methods are compared at equal distance from the base: the smallest, over methods, of the lower
    quartile of each method's final KLs (``statistics.quantiles``, inclusive), so that at least three quarters of
    every method's runs reach it (a run that stops short of it gets no reward there, and is counted out).

    The mean final KL would leave about half of the least-moving method's runs short of it, and a paired
    comparison there would keep only the seeds where BOTH runs get there."""
    def lower_quartile(values):
        return statistics.quantiles(values, n=4, method="inclusive")[0] if len(values) > 1 else values[0]
    return min(lower_quartile([r["kl"] for r in m["runs"]]) for m in results["methods"].values())


def bare_name(name: str) -> str:
    """A method's label without a suffix `` (...)`` such as `` (lr=0.001)``."""
    return name.split(" (")[0]


def control_pairs(names: Sequence[str], extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """(A, B) pairs to compare, as full labels: each method beside its control (``X-control`` is the control of
    ``X`` and of every ``X-...``, e.g. ``sail-pr-public-hook``), then the ``extra`` pairs, given by bare names
    (``("online-dpo", "offline-dpo")``), that are present."""
    by_bare = {bare_name(n): n for n in names}
    pairs = []
    for name in names:
        bare = bare_name(name)
        if bare.endswith("-control"):
            continue
        controls = [c for c in by_bare if c.endswith("-control") and (bare == c[:-len("-control")]
                                                                      or bare.startswith(c[:-len("-control")] + "-"))]
        if controls:
            pairs.append((name, by_bare[max(controls, key=len)]))
    return pairs + [(by_bare[a], by_bare[b]) for a, b in extra if a in by_bare and b in by_bare]


def paired_by_seed(results: dict, a: str, b: str, value: Callable[[dict], float | None] = lambda r: r["judge_reward"]
                   ) -> Paired | None:
    """``findings.paired`` of ``value(run)`` for methods A and B over the seeds both ran (and where ``value`` is
    not None for both, e.g. ``reward_at_kl``); None when fewer than 2 seeds pair up."""
    runs_a = {r["seed"]: value(r) for r in results["methods"][a]["runs"]}
    runs_b = {r["seed"]: value(r) for r in results["methods"][b]["runs"]}
    seeds = [s for s in runs_a if s in runs_b and runs_a[s] is not None and runs_b[s] is not None]
    return paired([runs_a[s] for s in seeds], [runs_b[s] for s in seeds]) if len(seeds) >= 2 else None


MIN_PAIRED_SEEDS = 5
"""The tables give a verdict only to comparisons with at least this many paired seeds: with fewer, the standard
error itself is too uncertain (from n - 1 <= 3 degrees of freedom) for a 3-SE rule to mean what it says."""


def comparisons(results: dict, extra: Sequence[tuple[str, str]] = ()) -> dict[str, dict]:
    """{"final": {"A - B": Paired}, "matched_kl": {"A - B at KL k": Paired}, "too_few": {"A - B (...)": n}}: the
    final judge reward, and the judge reward at the two methods' own matched KL k (``matched_kl`` of A and B alone;
    over the seeds where both runs reach it), of every pair of ``control_pairs`` with at least
    ``MIN_PAIRED_SEEDS`` paired seeds; the others in "too_few"."""
    found = {"final": {}, "matched_kl": {}, "too_few": {}}
    for a, b in control_pairs(list(results["methods"]), extra):
        kl_star = matched_kl({"methods": {name: results["methods"][name] for name in (a, b)}})
        for key, value, name in (("final", lambda r: r["judge_reward"], f"{a} - {b}"),
                                 ("matched_kl", lambda r: reward_at_kl(r, kl_star), f"{a} - {b} at KL {kl_star:.2f}")):
            p = paired_by_seed(results, a, b, value)
            if p is not None and p.n >= MIN_PAIRED_SEEDS:
                found[key][name] = p
            else:
                found["too_few"][name if key == "matched_kl" else f"{name} (final)"] = p.n if p else 0
    return found


def format_table(results: dict, budget_key: str = "judge_queries", budget_title: str = "judge queries",
                 extra: Sequence[tuple[str, str]] = (), budget_note: str = "") -> str:
    """Per method: judge reward, win rate vs base, KL to base (mean +- SD over seeds), judge reward at one
    matched KL (``matched_kl``), ``budget_key`` (mean over runs), n, wall time; then every variant minus its
    control (and the ``extra`` pairs), paired by seed, with the verdict of ``findings.paired``."""
    methods = results["methods"]
    kl_star = matched_kl(results)
    base_time = statistics.fmean(r["seconds"] for r in next(iter(methods.values()))["runs"])
    hide_times = os.environ.get("SAIL_HIDE_TIMINGS") == "1"      # set by the tests: times vary by machine
    width = max(26, *map(len, methods))
    head = (f"{'method':{width}s} {'judge reward':>15s} {'win rate vs base':>17s} {'KL to base':>15s} "
            f"{f'reward@KL={kl_star:.2f}':>16s} {budget_title:>13s} {'n':>3s} {'wall s':>7s} {'x first':>7s}")
    lines = [head, "-" * len(head)]
    for name, m in methods.items():
        runs = m["runs"]
        cells = [mean_sd([r[key] for r in runs]) for key in ("judge_reward", "win_rate", "kl")]
        seconds = statistics.fmean(r["seconds"] for r in runs)
        budget = statistics.fmean(r[budget_key] for r in runs)
        matched = [v for v in (reward_at_kl(r, kl_star) for r in runs) if v is not None]
        at_kl = f"{statistics.fmean(matched):7.3f} ({len(matched)}/{len(runs)})" if matched else f"{'-':>13s}"
        lines.append(f"{name:{width}s} {cells[0][0]:7.3f} +- {cells[0][1]:.3f} {cells[1][0]:8.3f} +- {cells[1][1]:.3f} "
                     f"{cells[2][0]:6.2f} +- {cells[2][1]:5.2f} {at_kl:>16s} {budget:13.0f} {len(runs):3d} "
                     + (f"{'-':>7s} {'-':>7s}" if hide_times else f"{seconds:7.1f} {seconds / base_time:7.2f}"))
    lines.append("-" * len(head))
    lines.append(f"base policy judge reward {results['base_judge_reward']:.3f}; mean +- SD over n seeds; reward@KL: "
                 f"mean over the runs (count) that reach that KL; 'x first' = wall time / first method's"
                 + (f"\n{budget_note}" if budget_note else ""))
    found = comparisons(results, extra)
    for key, title in (("final", "final judge reward"), ("matched_kl", "judge reward at the pair's matched KL")):
        if found[key]:
            lines += ["", f"{title}, A - B paired by seed (seeds where both runs have a value):",
                      format_paired_table(found[key], title="A - B")]
    if found["too_few"]:
        lines += ["", f"no verdict, fewer than {MIN_PAIRED_SEEDS} paired seeds: "
                  + "; ".join(f"{name}: n={n}" for name, n in found["too_few"].items())]
    return "\n".join(lines)


def comparison_panels(names: Sequence[str]) -> dict[str, list[str]]:
    """The panels of ``plot_comparison``: the baselines, then one panel per SAIL variant beside its control.

    A method ``X-control`` is the control of ``X`` and of every ``X-...`` (``sail-pr-public-hook``); a label
    suffix `` (...)`` such as `` (lr=0.001)`` is ignored. Methods without a control go to "baselines"."""
    variants = [bare_name(n)[: -len("-control")] for n in names if bare_name(n).endswith("-control")]
    panels, placed = {}, set()
    for variant in variants:
        members = [n for n in names if bare_name(n) == variant or bare_name(n).startswith(variant + "-")]
        panels[f"{variant} beside its control"] = members
        placed.update(members)
    baselines = [n for n in names if n not in placed]
    return ({"baselines": baselines} if baselines else {}) | panels


def far_runs(runs: Sequence[dict], factor: float = 3.0) -> list[dict]:
    """Runs whose final KL to the base is above ``factor`` x the median final KL of ``runs``: a run that went
    far from the others (diverged), which a mean over seeds would hide inside an error bar."""
    median = statistics.median(r["kl"] for r in runs)
    return [r for r in runs if r["kl"] > factor * median]


def plot_comparison(results: dict, reward_label: str = "judge reward", path=None, panels: dict | None = None,
                    controls: Sequence[str] = (), reference_lines: dict | None = None):
    """Small multiples, one column per panel (default ``comparison_panels``: baselines, then each SAIL variant
    beside its control; at most 6 methods a panel, a legend per panel, below its axes).

    Top: held-out judge reward at each evaluation step, mean +- SE over seeds (error bars; methods nudged
    sideways so the bars do not hide each other). Bottom: where each seed ended, final KL to the base against final
    judge reward (small dots, every seed), and the mean over seeds with +- SE error bars on both axes; a run whose
    final KL is above 3x the panel's median (``far_runs``) is ringed and labelled with its seed, so one diverged
    run is seen as one run, not as a wide band.

    A method keeps its colour in every panel; controls (names ending in ``-control``, and ``controls``) are
    dashed / open. ``reference_lines`` {label: reward} adds labelled horizontal lines (the base policy's is always
    drawn), which also give the y-axis a scale when the methods barely move."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = results["methods"]
    panels = panels or comparison_panels(list(methods))
    too_many = {title: len(names) for title, names in panels.items() if len(names) > 6}
    if too_many:
        raise ValueError(f"at most 6 methods a panel, got {too_many}")
    colors = {name: f"C{i % 10}" for i, name in enumerate(methods)}
    dashed = set(controls) | {n for n in methods if bare_name(n).endswith("-control")}
    lines = {"base policy": results["base_judge_reward"], **(reference_lines or {})}
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels) + 0.8, 8.4), sharey="row", squeeze=False,
                             layout="constrained")
    for column, (title, names) in enumerate(panels.items()):
        ax_curve, ax_end = axes[0, column], axes[1, column]
        panel_runs = [r for name in names for r in methods[name]["runs"]]
        far = {id(r) for r in far_runs(panel_runs)}
        for i, name in enumerate(names):
            runs, color, control = methods[name]["runs"], colors[name], name in dashed
            curves = [r["curve"] for r in runs]
            points = range(min(len(c) for c in curves))
            steps = [curves[0][j][0] for j in points]
            stats = [mean_sd([c[j][1] for c in curves]) for j in points]
            nudge = (i - (len(names) - 1) / 2) * 0.25
            ax_curve.errorbar([s + nudge for s in steps], [m for m, _ in stats], yerr=[sd / len(runs) ** 0.5 for _, sd in stats],
                              color=color, ls="--" if control else "-", marker="o", ms=3, capsize=2,
                              label=f"{name} (n={len(runs)})")
            kls, rewards = [r["kl"] for r in runs], [r["judge_reward"] for r in runs]
            ax_end.scatter(kls, rewards, color=color, alpha=0.35, s=12)
            (mean_kl, sd_kl), (mean_reward, sd_reward) = mean_sd(kls), mean_sd(rewards)
            ax_end.errorbar([mean_kl], [mean_reward], xerr=[sd_kl / len(runs) ** 0.5], yerr=[sd_reward / len(runs) ** 0.5],
                            color=color, marker="s" if control else "o", mfc="white" if control else color, ms=7,
                            capsize=3, label=f"{name}: mean +- SE (dots: each seed)")
            for r in runs:
                if id(r) in far:
                    ax_end.scatter([r["kl"]], [r["judge_reward"]], s=90, facecolor="none", edgecolor=color, lw=1.2)
                    ax_end.annotate(f"seed {r['seed']}", (r["kl"], r["judge_reward"]), xytext=(-6, 5), ha="right",
                                    textcoords="offset points", fontsize=7, color=color)
        for ax in (ax_curve, ax_end):
            for i, (label, value) in enumerate(lines.items()):     # the base: grey dots; others: black dash-dots
                ax.axhline(value, color="0.55" if i == 0 else "k", lw=0.9,
                           ls=":" if i == 0 else ("-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 1)))[(i - 1) % 3], label=label)
            ax.xaxis.set_major_locator(MaxNLocator(6))
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False)
        ax_curve.set_title(title)
        ax_curve.set_xlabel("training step")
        ax_end.set_xlabel("final KL(pi || pi_base), held-out prompts (nats)")
    axes[0, 0].set_ylabel(f"{reward_label}\nmean +- SE over seeds")
    axes[1, 0].set_ylabel(f"final {reward_label}")
    if path:
        fig.savefig(path, dpi=110)
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
