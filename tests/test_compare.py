"""The generic comparison's arithmetic: reward at matched KL, the table, the frontier plot."""
import pytest

from sail_min.lab.compare import format_table, matched_kl, plot_frontier, reward_at_kl


def run(curve, reference=0.0, seconds=1.0):
    """A run summary as run_comparison writes it: curve = [(step, judge reward, KL), ...]."""
    step, reward, kl = curve[-1]
    return {"curve": curve, "reference_judge_reward": reference, "judge_reward": reward, "kl": kl,
            "win_rate": 0.5, "seconds": seconds, "judge_labels": 10}


def test_reward_at_kl_interpolates_along_the_trajectory_from_the_base():
    r = run([(7, 0.4, 1.0), (14, 0.6, 3.0)], reference=0.0)
    assert reward_at_kl(r, 0.5) == pytest.approx(0.2)            # between the base (0, 0) and (1, 0.4)
    assert reward_at_kl(r, 2.0) == pytest.approx(0.5)
    assert reward_at_kl(r, 3.5) is None                          # never got that far


def test_matched_kl_is_the_smallest_mean_final_kl_and_the_table_shows_it(monkeypatch):
    results = {"base_judge_reward": 0.0, "methods": {
        name: {"runs": [run([(7, 0.1 * k, k)]), run([(7, 0.1 * k, k)])]} for name, k in (("a", 2.0), ("b", 4.0), ("c", 8.0))}}
    assert matched_kl(results) == 2.0
    monkeypatch.setenv("SAIL_HIDE_TIMINGS", "1")
    table = format_table(results)
    assert "reward@KL=2.00" in table and table.count("0.200 (2/2)") == 3   # reward 0.1 x KL on every line
    assert table.splitlines()[2].split()[-2:] == ["-", "-"]        # wall times hidden for the tests


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
        name: {"runs": [run([(7, 0.1 * k, k), (14, 0.2 * k, 2 * k)]), run([(7, 0.1, 1.0), (14, 0.3, 2.0)])]}
        for k, name in enumerate(names, 1)}}
    fig = plot_comparison(results, "judge reward", tmp_path / "comparison.png",
                          reference_lines={"dataset chosen": 0.5})
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert len(fig.axes) == 2 * len(panels)                        # learning curves above, reward vs KL below
    for ax in fig.axes:
        labels = ax.get_legend_handles_labels()[1]
        assert ax.get_legend() is not None and "base policy" in labels and "dataset chosen" in labels
        assert len(labels) - 2 <= 6                                 # at most 6 methods on one axes
