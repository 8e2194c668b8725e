"""The generic comparison's arithmetic: reward at matched KL, the paired verdicts, the table, the plots; and the
toy task's judge budget and generated summaries."""
import json
from pathlib import Path

import pytest

from sail_min.lab.compare import (comparisons, control_pairs, far_runs, format_table, matched_kl, paired_by_seed,
                                  plot_frontier, reward_at_kl)

ROOT = Path(__file__).resolve().parents[1]


def run(curve, reference=0.0, seconds=1.0, seed=0):
    """A run summary as run_comparison writes it: curve = [(step, judge reward, KL), ...]."""
    step, reward, kl = curve[-1]
    return {"curve": curve, "reference_judge_reward": reference, "judge_reward": reward, "kl": kl, "seed": seed,
            "win_rate": 0.5, "seconds": seconds, "judge_queries": 10}


def test_reward_at_kl_interpolates_along_the_trajectory_from_the_base():
    r = run([(7, 0.4, 1.0), (14, 0.6, 3.0)], reference=0.0)
    assert reward_at_kl(r, 0.5) == pytest.approx(0.2)            # between the base (0, 0) and (1, 0.4)
    assert reward_at_kl(r, 2.0) == pytest.approx(0.5)
    assert reward_at_kl(r, 3.5) is None                          # never got that far


def test_matched_kl_is_the_smallest_lower_quartile_of_final_kls_and_the_table_shows_it(monkeypatch):
    results = {"base_judge_reward": 0.0, "methods": {
        name: {"runs": [run([(7, 0.1 * k, k)]), run([(7, 0.1 * k, k)], seed=1)]} for name, k in (("a", 2.0), ("b", 4.0), ("c", 8.0))}}
    assert matched_kl(results) == 2.0
    monkeypatch.setenv("SAIL_HIDE_TIMINGS", "1")
    table = format_table(results)
    assert "reward@KL=2.00" in table and table.count("0.200 (2/2)") == 3   # reward 0.1 x KL on every line
    assert table.splitlines()[2].split()[-2:] == ["-", "-"]        # wall times hidden for the tests
    spread = {"base_judge_reward": 0.0, "methods": {
        "x": {"runs": [run([(7, 0.1, k)], seed=s) for s, k in enumerate((1.0, 2.0, 3.0, 4.0, 5.0))]},
        "y": {"runs": [run([(7, 0.1, 3.0)], seed=s) for s in range(5)]}}}
    assert matched_kl(spread) == 2.0                               # x's lower quartile: 4 of its 5 runs reach it


def test_frontier_plot_has_one_line_per_method(tmp_path):
    by_beta = {f"beta={b}": {"methods": {"a": {"runs": [run([(7, b, 1 / b)])]}, "b": {"runs": [run([(7, b / 2, 2 / b)])]}}}
               for b in (0.05, 0.1, 0.2)}
    path = plot_frontier(by_beta, "judge reward", tmp_path / "frontier.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_comparison_plot_puts_each_sail_variant_beside_its_control_with_a_legend_everywhere(tmp_path):
    from sail_min.lab.compare import comparison_panels, plot_comparison

    names = ["offline-dpo (lr=0.001)", "online-dpo", "sail-pr", "sail-pr-control", "sail-pr-public-hook",
             "sail-pp (lr=0.0005)", "sail-pp-control (lr=0.001)"]
    panels = comparison_panels(names)
    assert panels == {"baselines": ["offline-dpo (lr=0.001)", "online-dpo"],
                      "sail-pr beside its control": ["sail-pr", "sail-pr-control", "sail-pr-public-hook"],
                      "sail-pp beside its control": ["sail-pp (lr=0.0005)", "sail-pp-control (lr=0.001)"]}
    results = {"base_judge_reward": 0.0, "methods": {
        name: {"runs": [run([(7, 0.1 * k, k), (14, 0.2 * k, 2 * k)]), run([(7, 0.1, 1.0), (14, 0.3, 40.0 if k == 1 else 2.0)], seed=1)]}
        for k, name in enumerate(names, 1)}}
    fig = plot_comparison(results, "judge reward", tmp_path / "comparison.png",
                          reference_lines={"dataset chosen": 0.5})
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert len(fig.axes) == 2 * len(panels)                        # learning curves above, reward vs KL below
    for ax in fig.axes:
        labels = ax.get_legend_handles_labels()[1]
        assert ax.get_legend() is not None and "base policy" in labels and "dataset chosen" in labels
        assert len(labels) - 2 <= 6                                 # at most 6 methods on one axes

    fig.canvas.draw()
    for ax in fig.axes:                                            # legends sit below their axes, not over the data
        assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0
    annotated = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "seed 1" in annotated                                   # the far run (KL 40) is named, not averaged away


def test_each_variant_is_paired_with_its_control_by_seed_and_gets_a_computed_verdict(monkeypatch):
    names = ["offline-dpo (lr=0.001)", "online-dpo", "sail-pr", "sail-pr-control", "sail-pr-public-hook", "sail-pp"]
    assert control_pairs(names, extra=[("online-dpo", "offline-dpo"), ("online-dpo", "absent")]) == [
        ("sail-pr", "sail-pr-control"), ("sail-pr-public-hook", "sail-pr-control"), ("online-dpo", "offline-dpo (lr=0.001)")]
    # A = B + 0.1 on every seed, listed in another order: the pairing is by seed, not by position
    b = [run([(7, 0.5 + 0.01 * s, 2.0 + s)], seed=s) for s in range(6)]
    a = [run([(7, 0.6 + 0.01 * s + 0.001 * (-1) ** s, 3.0 + s)], seed=s) for s in reversed(range(6))]
    results = {"base_judge_reward": 0.0, "methods": {"sail-pr": {"runs": a}, "sail-pr-control": {"runs": b}}}
    p = paired_by_seed(results, "sail-pr", "sail-pr-control")
    assert p.n == 6 and p.difference == pytest.approx(0.1) and p.verdict == "above"
    found = comparisons(results)
    assert list(found["final"]) == ["sail-pr - sail-pr-control"]
    # at the matched KL 3.25 (the control's lower quartile) its seeds 0, 1 stop short: 4 paired seeds, no verdict
    assert found["matched_kl"] == {} and found["too_few"] == {"sail-pr - sail-pr-control at KL 3.25": 4}
    monkeypatch.setenv("SAIL_HIDE_TIMINGS", "1")
    table = format_table(results)
    assert "sail-pr - sail-pr-control" in table and "above" in table and "+0.100" in table
    assert "no verdict, fewer than 5 paired seeds: sail-pr - sail-pr-control at KL 3.25: n=4" in table
    assert paired_by_seed({"methods": {"x": {"runs": a[:1]}, "y": {"runs": b}}}, "x", "y") is None   # one seed: none


def test_far_runs_are_the_ones_far_above_the_median_kl():
    runs = [run([(7, 0.5, k)], seed=s) for s, k in enumerate((2.0, 3.0, 2.5, 25.0))]
    assert [r["seed"] for r in far_runs(runs)] == [3]


def test_the_toy_judge_budget_is_one_rule_for_every_method():
    from sail_min.config import SAILConfig
    from sail_min.lab.sentiment import judge_budget

    # offline DPO: the 672 dataset pairs it reads cost 2 queries each; online DPO: its own 336 labelled pairs
    assert judge_budget(SAILConfig.preset("offline-dpo"), 0, 672) == 1344
    assert judge_budget(SAILConfig.preset("online-dpo"), 1344, 672) == 1344
    assert judge_budget(SAILConfig.preset("sail-dp"), 0, 672) == 1344          # dp pairs are dataset pairs too
    assert judge_budget(SAILConfig.preset("sail-pr"), 414, 470) == 1354


def test_committed_toy_summaries_and_the_readme_tables_are_generated_from_the_committed_runs(tmp_path, monkeypatch):
    import shutil

    from sail_min.lab.experiments import markdown_report, write_summaries

    monkeypatch.setenv("SAIL_HIDE_TIMINGS", "1")
    for name in ("results.json", "results_full.json"):
        shutil.copy(ROOT / "results/toy" / name, tmp_path / name)
    assert write_summaries(tmp_path).read_text() == (ROOT / "results/toy/toy_tables.txt").read_text()
    main = json.loads((ROOT / "results/toy/results.json").read_text())
    assert markdown_report(main) in (ROOT / "README.md").read_text()
    # 20+ seeds wherever a claim needs them (iterative DPO is compared with nothing; the public term's gap is wide)
    assert min(len(m["runs"]) for name, m in main["methods"].items()
               if name not in ("iterative-dpo", "sail-pr-public-hook")) >= 20
