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
