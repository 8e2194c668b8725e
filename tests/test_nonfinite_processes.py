"""A non-finite step on ONE of two processes (gloo, CPU; ``tests/sharded_run.py`` under torchrun).

Every process must run backward, whose collectives (DDP's all-reduce, FSDP2's reduce-scatter)
wait for all of them, and then all must agree to skip: a step is taken only if the loss and the gradient
are finite on ALL processes. Each run is one step (``steps=1``) with the fault on process 1 only; it
must end (a hang is killed after ``TIMEOUT`` seconds and fails the test), skip the step on both processes
and leave the weights as they started, finite and the same on both.
"""
import json
import os
import subprocess
import sys

import psutil                      # an accelerate dependency
import pytest
import torch

from sail_min.lab.sentiment import load_base_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300          # as test_sharded.run; a run took 20-80 s on 2 shared, loaded cores; a hang never ends


def run_with_a_fault(out, engine, fault):
    """One step at 2 processes with ``fault`` on process 1; returns what each process saved."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "sharded_run.py"), str(out), engine, f"fault={fault}",
           "steps=1", "pairs_per_step=2", "eval_prompts=2", "max_new_tokens=4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(proc.pid)        # a worker outlived a kill of torchrun's group: kill the tree
        for process in [*launcher.children(recursive=True), launcher]:
            process.kill()
        _, stderr = proc.communicate()
        pytest.fail(f"{engine} with {fault} on process 1 did not end in {TIMEOUT} s (a hang): {stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0] and metrics[0]["skipped_steps"] == 1     # process 0's log
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def assert_skipped_on_both_with_the_starting_weights(ranks):
    base = {name: p for name, p in load_base_model()[0].named_parameters()}
    for rank, saved in enumerate(ranks):
        assert saved["skipped"] == 1, rank                                   # both processes skipped the step
        assert saved["weights"].keys() == base.keys()
        for name, value in saved["weights"].items():
            assert torch.isfinite(value).all(), (rank, name)
            assert torch.equal(value, base[name].detach()), (rank, name)    # untouched, bitwise
            assert torch.equal(value, ranks[0]["weights"][name]), (rank, name)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_nan_loss_on_one_process_skips_the_step_on_both_and_ends(engine, tmp_path):
    """Bug: the step skipped ``backward()`` on a process whose loss is not finite,
    so the other process waited in backward's collectives (a hang, or collectives mismatched). Now every
    process runs backward (a non-finite loss as a zero, same graph) and all agree to skip."""
    assert_skipped_on_both_with_the_starting_weights(run_with_a_fault(tmp_path, engine, "nan-loss"))


def test_a_nan_in_one_process_gradient_shard_skips_the_step_on_both(tmp_path):
    """Mutant: the step is taken if ANY process is finite (e.g. the all-reduced finite count compared
    with > 0, or a max instead of a sum) instead of ALL. Under FSDP2 each process holds a shard of the
    gradient: a NaN in process 1's shard alone (after the reduce-scatter) is seen by process 1 only,
    and a step taken anyway writes NaN into the weights."""
    assert_skipped_on_both_with_the_starting_weights(run_with_a_fault(tmp_path, "fsdp2", "nan-grad-shard"))
