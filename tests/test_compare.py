"""The generic comparison's arithmetic: reward at matched KL, the table, the frontier plot."""
import pytest

from sail_min.compare import format_table, matched_kl, plot_frontier, reward_at_kl


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
