"""Resume across process counts, and a judge failure on one of 2 processes (torchrun, gloo, CPU).

One story, written by one process and resumed by two, then by one: step 0 runs in one process; 2 processes resume
it, write the checkpoint of step 1, and at step 2 the judge of process 1 alone fails: every process ends with the
one-line message, process 0's last, and the checkpoint is kept. 2 processes resume it (a checkpoint of 2 processes
read under torchrun on a CPU, whose device is ``cpu:0``) and finish; one process resumes that for one more step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sail_min.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
ARGS = ["--model", "data/tiny/policy", "--data", "data/tiny/preferences.jsonl", "--judge", "cli_judge:fails_on_process_1",
        "--preset", "online-dpo", "--set", "checkpoint_every=1", "--set", "eval_prompts=4", "--set", "pairs_per_step=2",
        "--set", "max_new_tokens=8"]


def launch(processes, out, steps, *extra, env=None):
    runner = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    cmd = [sys.executable, *runner, "-m", "sail_min", "train", *ARGS, "--steps", str(steps), "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
                               "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {})})


def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_judge_failure_on_one_of_two_processes_ends_both_in_one_line_and_resume_works_across_process_counts(
        tmp_path):
    out, fixed = tmp_path / "run", tmp_path / "judge-fixed"
    first = launch(1, out, 1)
    assert first.returncode == 0, first.stderr[-3000:]

    failed = launch(2, out, 4, "--resume", env={"JUDGE_FIXED": str(fixed)})
    assert failed.returncode != 0
    errors = [line[line.index("error: "):] for line in failed.stderr.splitlines() if "error: " in line]
    problem = "judge 'cli_judge:fails_on_process_1' at step 2: raised RuntimeError('judge service down on process 1')"
    assert errors[0] == f"error: (process 1) {problem}" + errors[0].split(problem)[1]     # its own, first
    hint = (f"; the checkpoint {out / 'checkpoint.pt'} of the first 2 step(s) is kept; go on from it with: python -m "
            f"sail_min train {' '.join(ARGS)} --steps 4 --out {out} --resume (under the same launcher)")
    assert errors[-1] == f"error: process 1: {problem}{hint}"                    # process 0's, last
    assert len(errors) == 2
    before_launcher = failed.stderr[:failed.stderr.index(errors[-1])]      # then torchrun's own ChildFailedError
    assert "Traceback" not in before_launcher
    assert load_checkpoint(out / "checkpoint.pt")["next_step"] == 2 and steps_logged(out) == [0, 1]

    fixed.touch()
    resumed = launch(2, out, 4, "--resume", env={"JUDGE_FIXED": str(fixed), "REPORT_FINALISATION": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trained on 2 process(es)" in resumed.stdout and steps_logged(out) == [0, 1, 2, 3]
    # a finished run of 2 leaves through leave_process_group, not the finalisation that can abort it (gloo threads;
    # accelerate's end_training would have ended the group first, and with it the way to leave_process_group)
    assert "interpreter finalised" not in resumed.stdout

    alone = launch(1, out, 5, "--resume", env={"JUDGE_FIXED": str(fixed)})
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert steps_logged(out) == [0, 1, 2, 3, 4] and load_checkpoint(out / "checkpoint.pt")["next_step"] == 5


@pytest.mark.parametrize("device", ["cpu:0", "cpu"])
def test_a_checkpoint_loads_whatever_the_run_s_device_is_called(tmp_path, device):
    """torchrun on a CPU: accelerate's device is ``cpu:0``, to which ``torch.load(map_location=...)`` cannot map
    storages ("don't know how to restore data location"); the checkpoint is read onto the CPU instead, and a
    well-formed file that fails to load is never called corrupt."""
    import torch

    from sail_min.checkpoint import CheckpointError, save_checkpoint
    from sail_min.runtime import Runtime
    from sail_min.config import SAILConfig
    from sail_min.train import resume_from

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    config = SAILConfig()
    save_checkpoint(tmp_path / "checkpoint.pt", model=model, optimizer=optimizer, next_step=3, counters={},
                    config=config)
    runtime = Runtime(config)
    runtime.device = torch.device(device)
    assert resume_from(tmp_path / "checkpoint.pt", model, optimizer, runtime) == (3, {})
    with pytest.raises(CheckpointError, match="an intact torch file that failed to load here") as error:
        load_checkpoint(tmp_path / "checkpoint.pt", map_location=torch.device("cpu:0"))
    assert "corrupt" not in str(error.value)
