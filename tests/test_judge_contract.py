"""The judge contract: judge(prompts, responses) -> one finite real score per response.

Every violation is a ValueError naming the judge, the scores expected and received and the
first bad index; before, reward_model_labels returned N+1 labels, broadcast one score to
every pair, or (NaN >= s is False) made every second response 'chosen'."""
import math

import numpy as np
import pytest
import torch

from sail_min.labels import check_judge_scores, judge_name, reward_model_labels

PROMPTS = ["a", "b", "c"]
FIRST = ["good", "fine", "great"]
SECOND = ["bad", "meh", "awful"]


def vader_judge(prompts, responses):
    return [float(r in ("good", "fine", "great")) for r in responses]


class LengthJudge:
    def __call__(self, prompts, responses):
        return torch.tensor([float(len(r)) for r in responses])


def judge_returning(value):
    def odd_judge(prompts, responses):
        return value(len(responses)) if callable(value) else value
    return odd_judge


HALF, ZERO = [1.0, -2.0, 0.5], [1.0, -2.0, 0.0]
ACCEPTED = [
    ([1.0, -2.0, 0.5], HALF),
    ((1, -2, 0), ZERO),                                            # ints
    (torch.tensor([1.0, -2.0, 0.5], requires_grad=True), HALF),    # detached on the way
    (torch.tensor([1, -2, 0]), ZERO),
    (torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16), HALF),
    (np.array([1.0, -2.0, 0.5]), HALF),
    ([np.float32(1.0), torch.tensor(-2.0), 0.5], HALF),            # numpy scalars and 0-d tensors
]


@pytest.mark.parametrize("scores, expected", ACCEPTED, ids=range(len(ACCEPTED)))
def test_accepted_scores_become_float32_of_length_n(scores, expected):
    checked = check_judge_scores(scores, 3, vader_judge)
    assert checked.dtype == torch.float32 and checked.shape == (3,) and not checked.requires_grad
    assert checked.tolist() == expected


REFUSED = [
    # scores for 3 responses, expected message
    ([1.0, 2.0, 3.0, 4.0], "returned 4 scores for 3 responses"),                 # N + 1
    ([1.0, 2.0], "returned 2 scores for 3 responses"),                           # N - 1
    (torch.zeros(4), "returned 4 scores for 3 responses"),
    (0.5, "returned a single score 0.5, expected 3 scores"),                     # broadcast
    (torch.tensor(0.5), "returned a single score (0-d), expected 3 scores"),
    (np.float64(0.5), "returned a single score (0-d), expected 3 scores"),
    (torch.zeros(3, 1), "returned scores of shape (3, 1), expected 3 scores (shape (3,))"),
    (np.zeros((1, 3)), "returned scores of shape (1, 3)"),
    ([[1.0], [2.0], [3.0]], "score 0 is [1.0] (list), not a real number"),
    (["1.0", 2.0, 3.0], "returned 3 scores for 3 responses; score 0 is '1.0' (str), not a real number"),
    ([1.0, None, 3.0], "score 1 is None (NoneType), not a real number"),
    ([1.0, 2.0, True], "score 2 is True (bool), not a real number"),
    (torch.tensor([True, False, True]), "scores of dtype torch.bool (first bad index 0)"),
    (np.array(["a", "b", "c"]), "returned an array of dtype <U1, expected 3 numbers"),
    ("abc", "returned str 'abc', expected a list, tuple or 1-D tensor of 3 scores"),
    ({"a": 1.0, "b": 2.0, "c": 3.0}, "returned dict"),
    ([1.0, math.nan, math.nan], "score 1 is nan (2 of 3 not finite)"),
    (torch.tensor([1.0, 2.0, -math.inf]), "score 2 is -inf (1 of 3 not finite)"),
    (np.array([math.inf, 0.0, 0.0]), "score 0 is inf (1 of 3 not finite)"),
    ([1.0, 1e300, 0.0], "score 1 is 1e+300, too large for float32"),
]


@pytest.mark.parametrize("scores, message", REFUSED, ids=[m for _, m in REFUSED])
def test_refused_scores_name_the_judge_count_and_index(scores, message):
    with pytest.raises(ValueError) as error:
        check_judge_scores(scores, 3, vader_judge)
    assert str(error.value).startswith("judge 'vader_judge' returned") and message in str(error.value)


def test_reward_model_labels_holds_the_judge_to_the_contract():
    """One judge call for the pair set: the 3 pairs' 6 responses (every y1, then every y2)."""
    for value, message in [(lambda n: [0.0] * (n + 1), "judge 'odd_judge' returned 7 scores for 6 responses"),
                           (lambda n: [0.0] * (n - 1), "returned 5 scores for 6 responses"),
                           (1.0, "returned a single score 1.0"),
                           (lambda n: [math.nan] * n, "score 0 is nan (6 of 6 not finite)")]:
        with pytest.raises(ValueError) as error:
            reward_model_labels(judge_returning(value), PROMPTS, FIRST, SECOND)
        assert message in str(error.value)
    labels = reward_model_labels(vader_judge, PROMPTS, FIRST, SECOND)
    assert labels.first_is_chosen.tolist() == [True, True, True] and labels.first_scores.dtype == torch.float32
    calls = []
    reward_model_labels(lambda prompts, responses: calls.append((prompts, responses)) or vader_judge(prompts, responses),
                        PROMPTS, FIRST, SECOND)
    assert calls == [(list(PROMPTS) * 2, list(FIRST) + list(SECOND))]


def test_judge_names():
    assert judge_name(vader_judge) == "vader_judge"
    assert judge_name(LengthJudge()) == "LengthJudge"
    assert judge_name("eval judge") == "eval judge"
    with pytest.raises(ValueError, match="judge 'LengthJudge' returned 2 scores for 3 responses"):
        check_judge_scores(LengthJudge()(PROMPTS, ["x", "y"]), 3, LengthJudge())


# ---- the contract at every call: CheckedJudge ------------------------------------------------------
def test_every_call_is_held_to_the_contract_and_named_where_it_happened():
    import time

    from sail_min.labels import CheckedJudge, JudgeError

    calls = {"n": 0}

    def later_broken(prompts, responses):
        calls["n"] += 1
        return [1.0] * len(responses) if calls["n"] == 1 else [float("nan")] * len(responses)

    judge = CheckedJudge(later_broken, where="at step 0")
    assert judge(["x"] * 2, ["a", "b"]).tolist() == [1.0, 1.0]
    judge.where = "at step 7"
    with pytest.raises(JudgeError, match=r"^judge 'later_broken' at step 7: returned 2 scores for 2 responses; "
                                         r"score 0 is nan \(2 of 2 not finite\)$"):
        judge(["x"] * 2, ["a", "b"])

    def too_few(prompts, responses):
        return [0.0]

    with pytest.raises(JudgeError, match="judge 'too_few' at step 3: returned 1 scores for 2 responses"):
        CheckedJudge(too_few, where="at step 3")(["x"] * 2, ["a", "b"])

    def huge(prompts, responses):
        return [1e39] * len(responses)

    with pytest.raises(JudgeError, match="score 0 is 1e\\+39, too large for float32"):
        CheckedJudge(huge)(["x"], ["a"])

    def sleeps(prompts, responses):
        time.sleep(5)
        return [0.0] * len(responses)

    start = time.perf_counter()
    with pytest.raises(JudgeError, match=r"judge 'sleeps' at step 2: no answer within judge_timeout_s=0.2 s"):
        CheckedJudge(sleeps, timeout_s=0.2, where="at step 2")(["x"], ["a"])
    assert time.perf_counter() - start < 2

    def raises(prompts, responses):
        raise ConnectionError("reward server refused")

    with pytest.raises(JudgeError, match=r"judge 'raises': raised ConnectionError\('reward server refused'\)"):
        CheckedJudge(raises, timeout_s=1.0)(["x"], ["a"])          # through the timeout's thread too
