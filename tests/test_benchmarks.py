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
