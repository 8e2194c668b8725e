"""The bandit comparison: offline DPO, online DPO and the SAIL variants, several seeds.

Used by notebook 02 and by `python -m sail_min bandit`. Every method starts at pi_ref, sees
the same number of pairs per step, and is scored with the exact true reward, KL(pi || pi_ref)
and KL(pi || pi*) of the bandit (``sail_min.bandit``).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bandit import expected_reward, kl, make_bandit, train_sampled
from .config import SAILConfig


@dataclass
class BanditSetup:
    """The finite-sample, limited-coverage problem of the comparison."""

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
    offline_pairs_per_prompt: int = 4
    """size of the fixed offline dataset (reference samples, Bradley-Terry oracle labels)"""
    pairs_per_prompt: int = 16
    """pairs per prompt per step, for every method"""
    steps: int = 1000
    """Adam steps"""
    lr: float = 0.05
    """Adam learning rate on the logits"""
    n_seeds: int = 5
    """independent runs per method (dataset and samples differ)"""
    methods: dict = field(default_factory=lambda: dict(BANDIT_METHODS))
    """name -> SAILConfig (only its routing and coefficient fields matter here)"""


BANDIT_METHODS = {
    "offline DPO": SAILConfig.preset("offline-dpo"),
    "online DPO": SAILConfig.preset("online-dpo"),
    "SAIL-PR": SAILConfig.preset("sail-pr"),
    "SAIL-PR (public-code term)": SAILConfig.preset("sail-pr", response_mode="public"),
    "SAIL-PP": SAILConfig.preset("sail-pp"),
    "SAIL-DP": SAILConfig.preset("sail-dp"),
    # the control for SAIL-PR: the same 30% online pairs, response term off
    "online DPO on 30% (control)": SAILConfig.preset("sail-pr", pr_response_coef=0.0),
    # coefficient sweep of the exact response term on top of 100% online DPO
    "online DPO + response 0.1": SAILConfig.preset("online-dpo", pr_response_coef=0.1),
    "online DPO + response 0.3": SAILConfig.preset("online-dpo", pr_response_coef=0.3),
    "online DPO + response 1.0": SAILConfig.preset("online-dpo", pr_response_coef=1.0),
}


def mean_std(values) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_bandit_comparison(setup: BanditSetup = BanditSetup(), progress=None) -> dict:
    """Train every method of ``setup.methods``; return a JSON-ready dict of curves and summaries."""
    bandit = make_bandit(setup.n_prompts, setup.n_responses, setup.beta, setup.ref_scale, setup.problem_seed)
    results = {
        "setup": {k: v for k, v in asdict(setup).items() if k != "methods"},
        "reference_reward": expected_reward(bandit.ref_logits, bandit).item(),
        "optimal_reward": expected_reward(bandit.optimal_logits, bandit).item(),
        "optimal_kl_ref": kl(bandit.optimal_logits, bandit.ref_logits).item(),
        "reference_kl_opt": kl(bandit.ref_logits, bandit.optimal_logits).item(),
        "methods": {},
    }
    for name, config in setup.methods.items():
        start = time.perf_counter()
        history = train_sampled(bandit, config, n_seeds=setup.n_seeds, steps=setup.steps,
                        pairs_per_prompt=setup.pairs_per_prompt,
                        offline_pairs_per_prompt=setup.offline_pairs_per_prompt, lr=setup.lr)
        seconds = time.perf_counter() - start
        final = {key: mean_std(history[key][-1]) for key in ("reward", "kl_ref", "kl_opt")}
        results["methods"][name] = {"config": config.to_dict(), "history": history, "final": final,
                                    "seconds": seconds}
        if progress:
            progress(name)
    return results


def format_table(results: dict) -> str:
    """A plain-text table of final true reward, KL to pi_ref and KL to pi*, mean +- std over seeds."""
    n = results["setup"]["n_seeds"]
    lines = [f"{'method':30s} {'true reward':>16s} {'KL(pi||pi_ref)':>16s} {'KL(pi||pi*)':>16s} {'skipped':>8s}",  # skipped: non-finite steps, all runs
             "-" * 90]
    for name, res in results["methods"].items():
        cells = [f"{m:7.3f} +- {s:5.3f}" for m, s in (res["final"][k] for k in ("reward", "kl_ref", "kl_opt"))]
        lines.append(f"{name:30s} {cells[0]:>16s} {cells[1]:>16s} {cells[2]:>16s} "
                     f"{sum(res['history']['skipped_steps']):>8d}")
    lines.append("-" * 90)
    for name, reward, kl_ref, kl_opt in (("pi_ref", results["reference_reward"], 0.0, results["reference_kl_opt"]),
                                         ("pi* (closed form)", results["optimal_reward"], results["optimal_kl_ref"], 0.0)):
        lines.append(f"{name:30s} {reward:7.3f}{'':9s} {kl_ref:7.3f}{'':9s} {kl_opt:7.3f}")
    lines.append(f"(mean +- std over {n} seeds after {results['setup']['steps']} steps)")
    return "\n".join(lines)


def plot_bandit_comparison(results: dict, methods=None, path=None):
    """Curves of true reward, KL(pi || pi_ref), KL(pi || pi*) vs step: mean line, +- std band."""
    import matplotlib.pyplot as plt

    methods = methods or list(results["methods"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("reward", "true reward E[r*] (reward units)"), ("kl_ref", "KL(pi || pi_ref) (nats)"),
              ("kl_opt", "KL(pi || pi*) (nats)")]
    for ax, (key, label) in zip(axes, panels):
        for name in methods:
            hist = results["methods"][name]["history"]
            stats = [mean_std(v) for v in hist[key]]
            mean = [m for m, _ in stats]
            ax.plot(hist["step"], mean, label=name)
            ax.fill_between(hist["step"], [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
    axes[0].axhline(results["optimal_reward"], color="k", ls="--", lw=1, label="pi* (optimum)")
    axes[0].axhline(results["reference_reward"], color="gray", ls=":", lw=1, label="pi_ref")
    axes[0].legend(fontsize=7)
    axes[2].set_yscale("log")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def write_results(results: dict, out: str | Path) -> tuple[Path, Path]:
    """Write results.json and bandit_comparison.png to ``out``."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "bandit_results.json", out / "bandit_comparison.png"
    json_path.write_text(json.dumps(results, indent=1))
    fig = plot_bandit_comparison(results, path=png_path)
    plt.close(fig)
    return json_path, png_path
