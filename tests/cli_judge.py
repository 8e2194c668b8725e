"""Judges for tests/test_cli.py, loaded as `--judge cli_judge:NAME` with tests/ on PYTHONPATH."""


def word_count(prompts, responses):
    """A judge that likes long answers: the number of words of each response."""
    return [float(len(response.split())) for response in responses]


def one_score(prompts, responses):
    """Breaks the judge contract: one score for the whole batch."""
    return [0.0]


NOT_A_FUNCTION = 3


def raises(prompts, responses):
    """A judge whose service is down: raises on every call."""
    raise RuntimeError("judge service down")


CALLS = {"flaky": 0}


def flaky(prompts, responses):
    """Scores like word_count for its first 4 calls, then raises (a judge that fails mid-run)."""
    CALLS["flaky"] += 1
    if CALLS["flaky"] > 4:
        raise RuntimeError("judge service down")
    return word_count(prompts, responses)


def nan_later(prompts, responses):
    """Scores like word_count for its first 4 calls, then returns NaN for the first response (a broken contract
    mid-run)."""
    CALLS["nan_later"] = CALLS.get("nan_later", 0) + 1
    scores = word_count(prompts, responses)
    return scores if CALLS["nan_later"] <= 4 else [float("nan")] + scores[1:]


def hangs_later(prompts, responses):
    """Scores like word_count for its first 4 calls, then sleeps (a reward server that stopped answering)."""
    import time
    CALLS["hangs_later"] = CALLS.get("hangs_later", 0) + 1
    if CALLS["hangs_later"] > 4:
        time.sleep(30)
    return word_count(prompts, responses)


if __import__("os").environ.get("REPORT_FINALISATION"):      # a process that ends through the interpreter's
    __import__("atexit").register(print, "interpreter finalised", flush=True)   # finalisation says so


def fails_on_process_1(prompts, responses):
    """Scores like word_count, except on process 1 (torchrun's RANK) from its 4th call on (the calls: the check
    before training, a resumed run's reference samples, step 1, then step 2; one call per step's pair set), and
    not at all once the file named by $JUDGE_FIXED exists."""
    import os
    CALLS["fails_on_process_1"] = CALLS.get("fails_on_process_1", 0) + 1
    fixed = os.path.exists(os.environ.get("JUDGE_FIXED", "/nonexistent"))
    if os.environ.get("RANK") == "1" and CALLS["fails_on_process_1"] > 3 and not fixed:
        raise RuntimeError("judge service down on process 1")
    return word_count(prompts, responses)


def interrupted(prompts, responses):
    """Scores like word_count, except that its 5th call is where the user presses Ctrl-C."""
    CALLS["interrupted"] = CALLS.get("interrupted", 0) + 1
    if CALLS["interrupted"] == 5:
        raise KeyboardInterrupt
    return word_count(prompts, responses)
