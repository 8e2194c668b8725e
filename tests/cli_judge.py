"""Judges for tests/test_cli.py, loaded as `--judge cli_judge:NAME` with tests/ on PYTHONPATH."""


def word_count(prompts, responses):
    """A judge that likes long answers: the number of words of each response."""
    return [float(len(response.split())) for response in responses]


def one_score(prompts, responses):
    """Breaks the judge contract: one score for the whole batch."""
    return [0.0]


NOT_A_FUNCTION = 3
