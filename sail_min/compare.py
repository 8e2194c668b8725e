"""The main job: offline DPO, online DPO, SAIL-PR, SAIL-PP and SAIL-DP on the sentiment toy task.

Every method starts from the same tiny base policy (``data/sentiment/base``), takes the same
number of steps with the same number of pairs per step, and is scored by the same third-party
judge (VADER) on held-out prompts, for several seeds. Judge budget: the offline dataset holds
``steps * pairs_per_step`` pairs at the default setup (672 = 42 x 16), so building it cost as
many judge queries (2 per pair) as online DPO spends labelling its own samples. A method that
mixes dataset pairs with judge-labelled online pairs (SAIL-PR) gets only the first
``dataset_pairs - E[online judge pairs]`` dataset pairs, so that every method spends the same
expected judge budget; the table reports each method's actual total (dataset construction
included).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import SAILConfig
from .tasks.sentiment import load_base_model, load_sentiment_task
from .train import Task, train

METHODS = ["offline-dpo", "online-dpo", "sail-pr", "sail-pp", "sail-dp"]


@dataclass
class ComparisonSetup:
    """What the comparison runs; everything else is the preset's default (``SAILConfig``)."""

    methods: list = field(default_factory=lambda: list(METHODS))
    """preset names, or (label, preset name, dict of SAILConfig overrides)"""
    seeds: int = 5
    """runs per method"""
    steps: int = 42
    """optimiser steps per run (42 x 16 pairs = one pass over the 672 offline pairs)"""
    pairs_per_step: int = 16
    """pairs per step"""
    eval_every: int = 7
    """evaluation cadence in steps"""
    eval_prompts: int = 64
    """held-out prompts per evaluation"""
    lr: float = 5e-4
    """AdamW learning rate (the tiny model trains from its own base weights)"""
    beta: float = 0.1
    """KL coefficient"""
    threads: int = 1
    """torch CPU threads: one is fastest for this 0.35M-parameter model (None: leave torch's setting)"""
    config_overrides: dict = field(default_factory=dict)
    """SAILConfig fields applied to every method (e.g. max_new_tokens, mixed_precision)"""


QUICK = ComparisonSetup(seeds=2, steps=6, pairs_per_step=8, eval_every=3, eval_prompts=16)
"""A CI-sized version: same code path, smaller numbers."""


def mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def sentiment_task() -> Task:
    """The toy task of ``sail_min.tasks.sentiment`` as the loop's ``Task``."""
    sentiment = load_sentiment_task()
    return Task(sentiment.preferences(), sentiment.train_prompts, sentiment.eval_prompts,
                sentiment.judge, sentiment.bt_temperature)


def run_comparison(setup: ComparisonSetup, out: str | Path, progress: bool = True,
                   task: Task | None = None, load_policy=None, resume: bool = False) -> dict:
    """Train every method for every seed; write metrics per run; return the results dict.

    ``task`` and ``load_policy`` (a function returning a fresh ``(model, tokenizer)``) default to
    the sentiment toy task and its base model; the final notebook passes a real model and data.
    ``resume=True`` continues every run from its checkpoint in ``out`` (a finished run is read back
    from its metrics), so an interrupted comparison loses at most ``checkpoint_every`` steps a run.
    """
    if setup.threads:
        torch.set_num_threads(setup.threads)
    task = task or sentiment_task()
    load_policy = load_policy or load_base_model
    out = Path(out)
    results = {"setup": asdict(setup), "dataset_pairs": len(task.preferences), "methods": {}}
    for method in setup.methods:
        name, preset, overrides = (method, method, {}) if isinstance(method, str) else method
        runs = []
        for seed in range(setup.seeds):
            policy, tokenizer = load_policy()
            config = SAILConfig.preset(preset, steps=setup.steps, pairs_per_step=setup.pairs_per_step,
                                       eval_every=setup.eval_every, eval_prompts=setup.eval_prompts,
                                       lr=setup.lr, beta=setup.beta, seed=seed,
                                       output_dir=str(out / name / f"seed{seed}"),
                                       **{**setup.config_overrides, **overrides})
            run_task = _equal_judge_budget(task, config)
            start = time.perf_counter()
            history = train(config, policy, tokenizer, run_task, resume=resume, progress=progress)
            seconds = time.perf_counter() - start
            del policy                                    # free it (and its compiled graphs) before the next
            final = history[-1]
            reads_dataset = config.route_dpo + config.route_dp > 0
            runs.append({
                "seed": seed, "seconds": seconds,
                "judge_reward": final["eval/judge_reward"], "win_rate": final["eval/win_rate"],
                "reference_judge_reward": final["eval/reference_judge_reward"],
                "kl": final["eval/kl"], "response_length": final["eval/response_length"],
                "judge_queries": final["judge_queries"] + (2 * len(run_task.preferences) if reads_dataset else 0),
                "dataset_pairs": len(run_task.preferences) if reads_dataset else 0,
                "skipped_steps": final["skipped_steps"],
                "curve": [(h["step"] + 1, h["eval/judge_reward"], h["eval/kl"]) for h in history
                          if "eval/judge_reward" in h],
            })
        results["methods"][name] = {"config": asdict(config), "runs": runs}
    # the reference (= base) policy's samples that every win rate is measured against
    first_runs = next(iter(results["methods"].values()))["runs"]
    results["base_judge_reward"] = statistics.fmean(r["reference_judge_reward"] for r in first_runs)
    return results


def _equal_judge_budget(task: Task, config: SAILConfig) -> Task:
    """Trim the dataset by the expected number of judge-labelled online pairs (2 queries each)."""
    if config.route_pr == 0 or config.route_dpo + config.route_dp == 0:
        return task
    online_pairs = round(config.route_pr * config.steps * config.pairs_per_step)
    keep = max(1, len(task.preferences) - online_pairs)
    return dataclasses.replace(task, preferences=task.preferences[:keep])


def format_table(results: dict) -> str:
    """judge reward, win rate vs base, KL to base (mean +- std over seeds), judge queries, wall time."""
    methods = results["methods"]
    base_time = statistics.fmean(r["seconds"] for r in next(iter(methods.values()))["runs"])
    head = (f"{'method':14s} {'judge reward':>15s} {'win rate vs base':>17s} {'KL to base':>14s} "
            f"{'judge queries':>13s} {'wall s':>7s} {'x first':>7s}")
    lines = [head, "-" * len(head)]
    for name, m in methods.items():
        runs = m["runs"]
        cells = [mean_std(r[key] for r in runs) for key in ("judge_reward", "win_rate", "kl")]
        seconds = statistics.fmean(r["seconds"] for r in runs)
        queries = statistics.fmean(r["judge_queries"] for r in runs)
        lines.append(f"{name:14s} {cells[0][0]:7.3f} +- {cells[0][1]:.3f} {cells[1][0]:8.3f} +- {cells[1][1]:.3f} "
                     f"{cells[2][0]:6.2f} +- {cells[2][1]:.2f} {queries:13.0f} {seconds:7.1f} {seconds / base_time:7.2f}")
    lines.append("-" * len(head))
    n = len(next(iter(methods.values()))["runs"])
    lines.append(f"base policy judge reward {results['base_judge_reward']:.3f}; mean +- std over {n} seeds; "
                 f"'x first' = wall time relative to the first method")
    return "\n".join(lines)


def plot_comparison(results: dict, path=None):
    """Left: judge reward vs KL to base (each seed, and the mean). Right: judge reward vs step."""
    import matplotlib.pyplot as plt

    fig, (ax_front, ax_curve) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (name, m) in enumerate(results["methods"].items()):
        color = f"C{i}"
        rewards, kls = [r["judge_reward"] for r in m["runs"]], [r["kl"] for r in m["runs"]]
        ax_front.scatter(kls, rewards, color=color, alpha=0.4, s=20)
        ax_front.scatter([statistics.fmean(kls)], [statistics.fmean(rewards)], color=color, s=80,
                         edgecolor="k", label=name)
        curves = [r["curve"] for r in m["runs"]]
        steps = [c[0] for c in curves[0]]
        stats = [mean_std(curve[j][1] for curve in curves) for j in range(len(steps))]
        ax_curve.plot([0] + steps, [results["base_judge_reward"]] + [s for s, _ in stats], color=color, label=name)
        ax_curve.fill_between(steps, [a - b for a, b in stats], [a + b for a, b in stats], color=color, alpha=0.15)
    ax_front.set_xlabel("KL(pi || pi_base) on held-out prompts (nats per response)")
    ax_front.set_ylabel("judge reward (VADER compound, -1..1)")
    ax_front.set_title("reward vs KL frontier (small dots: seeds)")
    ax_front.legend(fontsize=8)
    ax_curve.set_xlabel("training step")
    ax_curve.set_ylabel("judge reward (VADER compound, -1..1)")
    ax_curve.set_title("learning curves (mean +- std over seeds)")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def write_results(results: dict, out: str | Path) -> list[Path]:
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "results.json", out / "comparison.png"
    json_path.write_text(json.dumps(results, indent=1))
    plt.close(plot_comparison(results, png_path))
    return [json_path, png_path]
