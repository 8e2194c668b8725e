"""The command line: `python -m sail_min check` and the bandit comparison."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, "-m", "sail_min", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_check_passes_and_reports_max_relative_error():
    proc = run("check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    worst = float(re.fullmatch(r"max relative error: (\S+)", lines[-1]).group(1))
    assert worst <= 1e-8
    for name in ("offline DPO", "SAIL-DP", "SAIL-PP", "SAIL-PR", "labels from oracle", "labels from policy",
                 "online DPO (response term off)", "Monte-Carlo SAIL-PR"):
        assert name in proc.stdout


def test_bandit_comparison_writes_table_json_and_png(tmp_path):
    proc = run("bandit", "--seeds", "2", "--steps", "30", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "online DPO" in proc.stdout and "pi* (closed form)" in proc.stdout
    results = json.loads((tmp_path / "bandit_results.json").read_text())
    assert len(results["methods"]["SAIL-PR"]["history"]["reward"][-1]) == 2
    assert (tmp_path / "bandit_comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_main_job_quick_writes_table_results_metrics_and_plots(tmp_path):
    proc = run("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("offline-dpo", "online-dpo", "sail-pr", "sail-pp", "sail-dp", "judge reward", "win rate"):
        assert name in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"offline-dpo", "online-dpo", "sail-pr", "sail-pp", "sail-dp"}
    assert len(results["methods"]["sail-pr"]["runs"]) == 2
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sail-dp" / "seed1" / "metrics.jsonl").exists()
    # a finished comparison resumed reads its runs back: the same results
    again = run("--quick", "--resume", "--out", str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((tmp_path / "results.json").read_text())
    for name, method in results["methods"].items():
        for a, b in zip(method["runs"], resumed["methods"][name]["runs"]):
            assert (a["judge_reward"], a["kl"], a["judge_queries"]) == (b["judge_reward"], b["kl"], b["judge_queries"])


def test_bad_arguments_are_rejected_with_a_message():
    proc = run("bandit", "--seeds", "0")
    assert proc.returncode == 2 and "--seeds" in proc.stderr
