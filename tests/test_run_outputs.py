"""What a run writes is never lost, and every way it can end early ends in one line: a folder that holds a run
is refused unless resumed or overwritten (command line and ``train()``), Ctrl-C, a disk that refuses a write,
damaged model folders, metrics files and checkpoints, a save killed half-way."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sail_min.__main__ import main
from sail_min.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from sail_min.config import SAILConfig
from sail_min.lab.sentiment import load_base_model, load_sentiment_task
from sail_min.metrics import MetricsError
from sail_min.train import OutputExistsError, Task, train

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
TINY = ["--model", "data/tiny/policy", "--data", "data/tiny/preferences.jsonl", "--judge", "data/tiny/reward"]
SMALL = ["--set", "eval_prompts=4", "--set", "pairs_per_step=4", "--set", "max_new_tokens=8"]


@pytest.fixture(scope="module")
def sentiment():
    return load_sentiment_task()


@pytest.fixture
def in_process(monkeypatch):
    """Call `main` here (no subprocess start-up)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(TESTS))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_task(sentiment, judge=None):
    return Task(sentiment.preferences()[:8], sentiment.train_prompts[:8], sentiment.eval_prompts,
                judge or sentiment.judge, sentiment.bt_temperature)


def tiny_config(out, **changes):
    return SAILConfig.preset("offline-dpo", **{**dict(steps=2, pairs_per_step=2, eval_prompts=2, eval_every=2,
                                                      checkpoint_every=1, max_new_tokens=4, output_dir=str(out)),
                                               **changes})


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def cli_run(*args, preexec_fn=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    return subprocess.run([sys.executable, "-m", "sail_min", "train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env, preexec_fn=preexec_fn)


# --------------------------------------------------------------------------------------
# a folder that holds a run
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("held", ["checkpoint.pt", "metrics.jsonl", "config.json"])
def test_train_refuses_a_folder_that_holds_a_run_unless_resumed_or_overwritten(sentiment, tmp_path, held):
    """Refused before anything is read or written (the policy is not even looked at)."""
    (tmp_path / held).write_text("an earlier run's")
    with pytest.raises(OutputExistsError, match=f"{tmp_path} holds a run \\({held}\\)"):
        train(tiny_config(tmp_path), None, None, tiny_task(sentiment), progress=False)
    assert (tmp_path / held).read_text() == "an earlier run's"
    with pytest.raises(ValueError, match="contradict"):
        train(tiny_config(tmp_path), None, None, tiny_task(sentiment), resume=True, overwrite=True)


def test_overwrite_replaces_the_earlier_run_and_resume_continues_it(sentiment, tmp_path):
    config = tiny_config(tmp_path)
    first = train(config, *load_base_model(), tiny_task(sentiment), progress=False)
    (tmp_path / "skipped").mkdir()
    again = train(config, *load_base_model(), tiny_task(sentiment), progress=False, overwrite=True)
    assert [r["loss"] for r in again] == [r["loss"] for r in first] and not (tmp_path / "skipped").exists()
    resumed = train(config.replace(steps=3), *load_base_model(), tiny_task(sentiment), progress=False, resume=True)
    assert [r["step"] for r in resumed] == [0, 1, 2]


def test_a_file_as_output_dir_is_refused(sentiment, tmp_path, in_process, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=f"{path}: is a file"):
        train(tiny_config(path), None, None, tiny_task(sentiment))
    assert main(["train", *TINY, *SMALL, "--steps", "1", "--out", str(path)]) == 2
    assert one_error_line(capsys).startswith(f"error: --out {path}: is a file, not a folder")


def test_the_command_line_refuses_a_run_folder_an_empty_out_and_a_config_s_own_folder(in_process, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *TINY, *SMALL, "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "config.json")}
    capsys.readouterr()
    assert main(argv) == 2                                         # again, without --resume: refused
    assert one_error_line(capsys).startswith(f"error: --out {out} holds a run (checkpoint.pt, metrics.jsonl, "
                                             f"config.json)")
    assert main(["train", *TINY, *SMALL, "--steps", "1", "--config", str(out / "config.json")]) == 2
    assert one_error_line(capsys) == (f"error: --config {out / 'config.json'}: its output_dir {str(out)!r} is the "
                                      f"folder of the run it came from; a new run needs --out (or --resume to "
                                      f"continue that run)")
    assert {name: (out / name).read_bytes() for name in before} == before     # nothing was touched
    assert main(["train", *TINY, *SMALL, "--steps", "1", "--out", ""]) == 2
    assert "--out '': an empty output folder" in one_error_line(capsys)
    assert main([*argv, "--resume", "--overwrite"]) == 2
    assert "contradict" in one_error_line(capsys)
    assert main([*argv, "--overwrite"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


# --------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------
def test_ctrl_c_ends_in_one_line_with_the_step_the_checkpoint_and_the_resume_command(in_process, tmp_path, capsys,
                                                                                      monkeypatch):
    import cli_judge
    monkeypatch.setitem(cli_judge.CALLS, "interrupted", 0)
    out = tmp_path / "run"
    argv = ["train", *TINY, *SMALL, "--preset", "online-dpo", "--steps", "4", "--out", str(out),
            "--set", "checkpoint_every=1"]
    argv[argv.index("data/tiny/reward")] = "cli_judge:interrupted"
    assert main(argv) == 2
    done = load_checkpoint(out / "checkpoint.pt")["next_step"]
    line = one_error_line(capsys)
    assert line.startswith(f"error: interrupted (Ctrl-C) after {done} step(s); the checkpoint "
                           f"{out / 'checkpoint.pt'} of the first {done} step(s) is kept; go on from it with: "
                           f"python -m sail_min train"), line
    assert line.endswith("--resume") and "Traceback" not in line
    assert main([*argv, "--resume"]) == 0                     # the judge no longer interrupts (its 5th call is past)
    assert [json.loads(row)["step"] for row in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------
# disks
# --------------------------------------------------------------------------------------
def test_a_full_disk_ends_in_one_line_naming_the_checkpoint(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, what a full disk looks like to a write: EFBIG instead of ENOSPC) under
    the checkpoint's size: the save fails in torch's zip writer, which hides the system's reason."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "run"
    proc = cli_run(*TINY, *SMALL, "--steps", "1", "--out", str(out), preexec_fn=small_files)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {out / 'checkpoint.pt'}: the checkpoint could not be written ("), line
    assert not list(out.glob("checkpoint.pt.*.tmp"))                 # the temporary file is gone too


def test_save_checkpoint_names_the_file_and_the_system_s_reason(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "checkpoint.pt"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match=f"{path}: the checkpoint could not be written \\(No space left "
                                                   f"on device; .* MiB free there\\)"):
        save_checkpoint(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), next_step=1,
                        counters={}, config={})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_ends_in_one_line_naming_it(in_process, tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["train", *TINY, *SMALL, "--steps", "1", "--out", str(folder / "run")]) == 2
    finally:
        folder.chmod(0o755)
    assert one_error_line(capsys) == f"error: {folder / 'run'}: Permission denied"


def test_a_save_killed_half_way_leaves_a_temporary_file_the_next_run_removes_and_names(sentiment, tmp_path):
    config = tiny_config(tmp_path, steps=1)
    train(config, *load_base_model(), tiny_task(sentiment), progress=False)
    stray = tmp_path / "checkpoint.pt.k1ll3d.tmp"                  # what SIGKILL during torch.save leaves
    stray.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.warns(RuntimeWarning, match=f"removed 1 temporary file\\(s\\) of a checkpoint save that was killed: "
                                            f"{stray}"):
        train(config.replace(steps=2), *load_base_model(), tiny_task(sentiment), progress=False, resume=True)
    assert not stray.exists() and load_checkpoint(tmp_path / "checkpoint.pt")["next_step"] == 2


# --------------------------------------------------------------------------------------
# damaged files
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated weights", "config.json not JSON"])
def test_a_damaged_model_folder_ends_in_one_line_naming_it(in_process, tmp_path, capsys, damage):
    model = tmp_path / "policy"
    shutil.copytree(ROOT / "data" / "tiny" / "policy", model)
    if damage == "truncated weights":
        weights = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    else:
        (model / "config.json").write_text('{"model_type": "llama", ')
    assert main(["train", *TINY, *SMALL, "--model", str(model), "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys).startswith(f"error: --model {model}: cannot load a causal language model (")


def test_a_damaged_metrics_file_is_named_and_a_missing_one_is_said(sentiment, tmp_path):
    config = tiny_config(tmp_path, steps=2)
    full = train(config, *load_base_model(), tiny_task(sentiment), progress=False)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("[1, 2]\n" + lines[1] + "\n")                    # the first line is not a record
    with pytest.raises(MetricsError, match=f"{metrics} line 1: not a metrics line"):
        train(config.replace(steps=3), *load_base_model(), tiny_task(sentiment), progress=False, resume=True)
    metrics.write_bytes(b"\xff\xfe not text")
    with pytest.raises(MetricsError, match=f"{metrics}: cannot be read"):
        train(config.replace(steps=3), *load_base_model(), tiny_task(sentiment), progress=False, resume=True)
    metrics.unlink()
    with pytest.warns(RuntimeWarning, match=f"{metrics} is missing: the metrics of steps 0-1 are lost; the file "
                                            f"starts again at step 2"):
        resumed = train(config.replace(steps=3), *load_base_model(), tiny_task(sentiment), progress=False, resume=True)
    assert [r["step"] for r in resumed] == [2] and len(full) == 2
    metrics.write_text(json.dumps(full[1]) + "\n" + json.dumps(resumed[0]) + "\n")     # step 0's line deleted
    with pytest.warns(RuntimeWarning, match="lacks the lines of 1 step\\(s\\) before 3 \\(first 0\\): they are lost"):
        train(config.replace(steps=4), *load_base_model(), tiny_task(sentiment), progress=False, resume=True)


def test_the_dropped_metrics_line_warning_reaches_the_command_line(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, *SMALL, "--steps", "1", "--out", str(out)]
    assert cli_run(*args).returncode == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1, "lo')                                        # killed while writing step 1's line
    proc = cli_run(*[a if a != "1" else "2" for a in args], "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"warning: {out / 'metrics.jsonl'} line 2 is not complete JSON (a run killed while writing?): dropped, "
            f"the step is redone") in proc.stderr.splitlines()


def test_resume_with_other_data_or_another_model_is_refused_the_judge_may_change(sentiment, tmp_path):
    config = tiny_config(tmp_path, steps=1)
    task = tiny_task(sentiment)
    train(config, *load_base_model(), task, progress=False)
    swapped = dataclasses.replace(task, preferences=[{**row, "chosen": row["rejected"], "rejected": row["chosen"]}
                                                     for row in task.preferences])
    with pytest.raises(ValueError, match="was written for other training data"):
        train(config.replace(steps=2), *load_base_model(), swapped, progress=False, resume=True)
    policy, tokenizer = load_base_model()
    with torch.no_grad():
        next(policy.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="was written for other starting weights"):
        train(config.replace(steps=2), policy, tokenizer, task, progress=False, resume=True)
    other_judge = dataclasses.replace(task, judge=lambda prompts, responses: [0.0] * len(responses))
    assert [r["step"] for r in train(config.replace(steps=2), *load_base_model(), other_judge, progress=False,
                                     resume=True)] == [0, 1]


def strip_timing(history):
    drop = ("time/", "tokens_per_second")
    return [{k: v for k, v in h.items() if not k.startswith(drop)} for h in history]


def test_a_half_written_metrics_line_is_dropped_on_resume_with_a_warning(sentiment, tmp_path):
    """Mutant: ``metrics.open_metrics`` does not catch a half-written last line (it fails on it, keeps it, or
    says nothing). A run killed while writing step 2's line (checkpoint of step 1 saved, then
    ``{"step": 2, "lo`` with no newline) resumes with a warning, and its returned metrics and its
    metrics.jsonl are those of the uninterrupted run."""
    task = Task(sentiment.preferences()[:16], sentiment.train_prompts[:16], sentiment.eval_prompts,
                sentiment.judge, sentiment.bt_temperature)
    config = SAILConfig.preset("offline-dpo", steps=4, pairs_per_step=2, eval_every=2, eval_prompts=2,
                               checkpoint_every=2, max_new_tokens=4, output_dir=str(tmp_path / "full"))
    full = train(config, *load_base_model(), task, progress=False)

    config = config.replace(output_dir=str(tmp_path / "killed"))
    calls = {"n": 0}

    def judge_killed_at_step_3s_evaluation(prompts, responses):   # calls: reference, step 1, step 3
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return task.judge(prompts, responses)

    with pytest.raises(KeyboardInterrupt):
        train(config, *load_base_model(), dataclasses.replace(task, judge=judge_killed_at_step_3s_evaluation),
              progress=False)
    out = Path(config.output_dir)
    assert load_checkpoint(out / "checkpoint.pt")["next_step"] == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:2]) + '{"step": 2, "lo')

    with pytest.warns(RuntimeWarning, match="line 3 is not complete JSON"):
        resumed = train(config, *load_base_model(), task, resume=True, progress=False)
    assert strip_timing(resumed) == strip_timing(full)
    written = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert strip_timing(written) == strip_timing(full)
