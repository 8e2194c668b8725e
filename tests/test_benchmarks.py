"""The benchmark script runs on the CPU at CI size and reports every ratio it promises."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_sail_tiny_reports_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_sail.py", "--model", "tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = json.loads(out.read_text())["ratios"]
    for key in ("sail_vs_dpo_time", "lean_vs_naive_peak", "lean_ckpt_vs_naive_peak",
                "sampler_static_vs_generate_tokens_per_s", "iteration_generate_fraction"):
        assert isinstance(ratios[key], float) and ratios[key] > 0, key
    fractions = [ratios[f"iteration_{part}_fraction"] for part in ("generate", "label", "train")]
    assert abs(sum(fractions) - 1) < 1e-6
    assert "greedy tokens identical (static vs plain): True" in proc.stdout
    agreement = json.loads(out.read_text())["generation"]["static_path_agreement"]
    assert agreement[0]["dtype"] == "float32" and agreement[0]["greedy_identical"]
    assert agreement[0]["logprob_max_gap"] <= agreement[0]["tolerance"] == 1e-3


def test_bench_loop_tiny_runs_the_whole_loop_and_reports_skips_and_compilations(tmp_path):
    out = tmp_path / "loop.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_loop.py", "--size", "tiny", "--steps", "4",
                           "--variant", "", "--variant", "cudagraph_isolation=false,generation_shapes=bucketed",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["method"], r["overrides"]) for r in results] == [
        (m, v) for v in ({}, {"cudagraph_isolation": False, "generation_shapes": "bucketed"})
        for m in ("online-dpo", "sail-pr", "sail-pp")]
    for r in results:
        assert r["steps"] == 4 and r["skipped_steps"] == 0 and r["compilations"] == 0   # CPU: nothing compiles
        assert r["generate_s"] > 0 and r["train_s"] > 0 and r["evaluate_s"] > 0
    assert "skipped" in proc.stdout and "graphs" in proc.stdout
    checks = json.loads(out.read_text())["attention_check"]                  # CPU: the policy half only
    assert [(c["length"], c["kernels"]) for c in checks] == [
        (length, f"cudnn_attention={allowed}") for length in (320, 384) for allowed in (True, False)]
    assert all(c["nonfinite_grad_values"] == 0 and c["logps_finite"] for c in checks)


def _bench_trl_table(*files):
    proc = subprocess.run([sys.executable, "benchmarks/bench_trl.py", "--table", *map(str, files)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[2:], proc.stderr


def test_bench_trl_tables_in_the_readme_are_the_saved_measurements():
    """benchmarks/README.md's TRL tables (and their verdicts) are what --table computes from the committed files."""
    readme = open(os.path.join(ROOT, "benchmarks", "README.md")).read()
    for name, rounds in (("bench_trl_cpu_confirm.json", 40), ("bench_trl_cpu.json", 16)):
        rows, _ = _bench_trl_table(os.path.join(ROOT, "results", "benchmarks", name))
        assert len(rows) == 4 and all(row.endswith(f"| {rounds} |") for row in rows)
        for row in rows:
            assert row in readme, row


def test_bench_trl_table_leaves_out_a_half_measured_round_and_gives_one_round_no_verdict(tmp_path):
    results = json.loads(open(os.path.join(ROOT, "results", "benchmarks", "bench_trl_cpu_confirm.json")).read())
    partial = tmp_path / "partial.json"                       # as if stopped halfway through round 139's last workload
    partial.write_text(json.dumps([r for r in results if not (r["seed"] == 139 and r["workload"] == "online-sentiment"
                                                              and r["side"] == "sail_min")]))
    rows, stderr = _bench_trl_table(partial)
    assert "online-sentiment: round(s) [139] measured on one side only, left out" in stderr
    assert rows[3].endswith("| 39 |") and "(SE, n=39)" in rows[3] and rows[0].endswith("| 40 |")
    one = tmp_path / "one.json"
    one.write_text(json.dumps([r for r in results if r["seed"] == 100]))
    rows, _ = _bench_trl_table(one)
    assert len(rows) == 4 and all("(n=1): no verdict from one round" in row for row in rows)
