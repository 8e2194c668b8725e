"""Issue 18, item 0: tests for the mutants that survived a mutation run of ``tests/`` (29 of 36 killed).

Each test names the mutant it kills (checked by planting it by hand: the test fails on the mutant and
passes on the code as written):

  * labels re-drawn (the judge asked again) at every step of a reuse round, not once per round;
  * expected self-labels given to pairs by where their responses come from, not by who labels them;
  * the response term's leave-one-out baseline taken over the whole step instead of per route;
  * judge scores multiplied by the Bradley-Terry temperature instead of divided by it;
  * a judge input longer than the judge's limit cut on the wrong side (or not counted);
  * a half-written metrics line (a run killed while writing it) not caught on resume.

The multi-process ones (a step taken if ANY process is finite; a NaN loss on one process) are in
``tests/test_nonfinite_processes.py``.
"""
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import sail_min.train as train_module
from sail_min.checkpoint import load_checkpoint
from sail_min.config import ROUTES, SAILConfig
from sail_min.labels import PairLabels, RewardModelScorer, reward_scores
from sail_min.lab.sentiment import load_base_model, load_sentiment_task
from sail_min.train import PairLogps, StepPairs, Task, label_pairs, pair_loss, train

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
DP, PP, PR = (ROUTES.index(name) for name in ("dp", "pp", "pr"))


@pytest.fixture(scope="module")
def sentiment():
    return load_sentiment_task()


def strip_timing(history):
    drop = ("time/", "tokens_per_second")
    return [{k: v for k, v in h.items() if not k.startswith(drop)} for h in history]


def binary_entropy(z: torch.Tensor) -> torch.Tensor:
    """H(sig(z)) = -sig(z) log sig(z) - sig(-z) log sig(-z), by hand."""
    return -(torch.sigmoid(z) * F.logsigmoid(z) + torch.sigmoid(-z) * F.logsigmoid(-z))


# --------------------------------------------------------------------------------------
# 3. label: once per reuse round
# --------------------------------------------------------------------------------------
def test_a_reuse_round_asks_the_judge_only_at_its_first_step(sentiment, tmp_path, monkeypatch):
    """Mutant: ``label_pairs`` runs at every step of a reuse round (labels re-drawn), while the
    ``judge_queries`` counter still counts once per round. The judge's own calls on training pairs,
    counted when each step's metrics are recorded, must equal ``judge_queries``: 2 responses per pair
    at the first step of each round, none at the others."""
    eval_prompts = set(sentiment.eval_prompts)
    judged = {"responses": 0}

    def counting_judge(prompts, responses):
        on_eval = [p in eval_prompts for p in prompts]
        assert all(on_eval) or not any(on_eval)              # evaluation and labelling never mix
        if not any(on_eval):
            judged["responses"] += len(responses)
        return sentiment.judge(prompts, responses)

    at_record = []
    step_record = train_module.step_record

    def recording_step_record(*args, **kwargs):
        at_record.append(judged["responses"])
        return step_record(*args, **kwargs)

    monkeypatch.setattr(train_module, "step_record", recording_step_record)
    task = Task([], sentiment.train_prompts[:16], sentiment.eval_prompts, counting_judge, sentiment.bt_temperature)
    config = SAILConfig.preset("iterative-dpo", steps=4, pairs_per_step=3, reuse_steps=2, eval_every=4,
                               eval_prompts=2, max_new_tokens=4, output_dir=str(tmp_path))
    history = train(config, *load_base_model(), task, progress=False)
    assert [h["judge_queries"] for h in history] == [6, 6, 12, 12]          # 3 pairs x 2 responses per round
    assert at_record == [h["judge_queries"] for h in history]


# --------------------------------------------------------------------------------------
# 4. loss: expected self-labels by who labels; the baseline per route
# --------------------------------------------------------------------------------------
def test_expected_self_labels_go_to_pairs_the_policy_labels_not_to_pairs_it_wrote():
    """Mutant: ``pair_loss`` picks the expected-label pairs by RESPONSES_FROM (dp no, pp yes, pr yes)
    instead of LABELS_FROM (dp yes, pp yes, pr no). On routes [dp, pp, pr] with ``self_labels="expected"``
    the dp and pp pairs get the binary entropy H(sig(z)) (z in their own order y1 vs y2) as DPO and
    label terms; the pr pair gets -log sig(z) under the judge's label (here: y2 chosen)."""
    config = SAILConfig(route_dpo=0.0, route_dp=0.4, route_pp=0.3, route_pr=0.3, dp_label_coef=0.2, pp_coef=0.2,
                        pr_response_coef=0.3, self_labels="expected")
    logps = PairLogps(policy_first=torch.tensor([-5.0, -7.0, -3.0]), policy_second=torch.tensor([-9.0, -4.0, -8.0]),
                      ref_first=torch.tensor([-6.0, -4.0, -5.0]), ref_second=torch.tensor([-2.0, -9.0, -4.0]))
    routes = torch.tensor([DP, PP, PR])
    labels = PairLabels(torch.tensor([True, True, False]))      # dp, pp: pair order kept (expected); pr: judge says y2
    loss = pair_loss(logps, labels, routes, config)

    z_pair_order = config.beta * ((logps.policy_first - logps.ref_first) - (logps.policy_second - logps.ref_second))
    z_pr = -z_pair_order[2]                                      # chosen = y2
    entropy = binary_entropy(z_pair_order[:2])
    torch.testing.assert_close(loss.dpo, torch.cat([entropy, -F.logsigmoid(z_pr)[None]]))
    torch.testing.assert_close(loss.label, torch.cat([entropy, -0.5 * F.logsigmoid(z_pr)[None] ** 2]))
    # the two rules differ by far more than round-off on every pair here
    assert (entropy + F.logsigmoid(z_pair_order[:2])).abs().min() > 0.1
    assert (binary_entropy(z_pr) + F.logsigmoid(z_pr)).abs() > 0.1


def test_the_response_baseline_is_the_leave_one_out_mean_within_each_route():
    """Mutant: ``pair_loss`` passes no ``groups`` to ``sail_loss``, so the leave-one-out baseline is
    the mean over the whole step. Routes [pp, pr, pp, pr, pp] (both with a response term), sampled
    labels: pair i's response term is (f_i - b_i)(l_w + l_l) with f = -log sig(z) and b_i the mean of
    f over the OTHER pairs of pair i's route."""
    config = SAILConfig(route_dpo=0.0, route_pp=0.5, route_pr=0.5, pp_coef=0.2, pr_response_coef=0.3)
    logps = PairLogps(policy_first=torch.tensor([-5.0, -7.0, -3.0, -6.0, -2.0]),
                      policy_second=torch.tensor([-9.0, -4.0, -8.0, -6.5, -7.0]),
                      ref_first=torch.tensor([-6.0, -4.0, -5.0, -9.0, -3.0]),
                      ref_second=torch.tensor([-2.0, -9.0, -4.0, -5.0, -8.0]))
    routes = torch.tensor([PP, PR, PP, PR, PP])
    loss = pair_loss(logps, PairLabels(torch.ones(5, dtype=torch.bool)), routes, config)

    f = (-F.logsigmoid(loss.z)).tolist()
    by_route = {PP: [0, 2, 4], PR: [1, 3]}
    b = [sum(f[j] for j in by_route[int(routes[i])] if j != i) / (len(by_route[int(routes[i])]) - 1)
         for i in range(5)]
    b_whole_step = [(sum(f) - f[i]) / 4 for i in range(5)]
    both = (logps.policy_first + logps.policy_second).tolist()
    expected = torch.tensor([(f[i] - b[i]) * both[i] for i in range(5)])
    torch.testing.assert_close(loss.response, expected)
    assert max(abs(x - y) for x, y in zip(b, b_whole_step)) > 0.1           # the grouping matters here


# --------------------------------------------------------------------------------------
# 3. label: the judge's Bradley-Terry temperature divides the scores
# --------------------------------------------------------------------------------------
def test_judge_scores_are_divided_by_the_temperature():
    """Mutant: ``label_pairs`` multiplies the judge's scores by ``judge_temperature`` instead of dividing.
    T = 0.01 and score gaps of +-1: P(y1 > y2) = sig(+-100), 1 or 0 in float32, so every label is the
    better response; multiplied, P = sig(+-0.01), about 1/2, and 64 pairs all agreeing has
    probability 2^-64 (and the generator is seeded: the test is deterministic)."""
    n = 64
    gaps = torch.tensor([1.0 if i % 3 else -1.0 for i in range(n)])
    scores = {f"a{i}": 0.5 * i for i in range(n)} | {f"b{i}": 0.5 * i - float(gaps[i]) for i in range(n)}

    def judge(prompts, responses):
        return [scores[r] for r in responses]

    pairs = StepPairs(routes=torch.full((n,), PR), prompts=["x"] * n, first=SimpleNamespace(texts=[f"a{i}" for i in range(n)]),
                      second=SimpleNamespace(texts=[f"b{i}" for i in range(n)]), truncated_prompts=0)
    zeros = torch.zeros(n)
    logps = PairLogps(zeros, zeros, zeros, zeros)
    config = SAILConfig(route_dpo=0.0, route_pr=1.0)
    task = Task([], ["x"], ["x"], judge, judge_temperature=0.01)
    labels, calls = label_pairs(pairs, logps, task, config, torch.Generator().manual_seed(0))
    assert calls == 2 * n
    assert labels.first_is_chosen.tolist() == (gaps > 0).tolist()


# --------------------------------------------------------------------------------------
# the judge's length limit: cut from the start, counted
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward():
    return (AutoModelForSequenceClassification.from_pretrained(TINY / "reward").eval(),
            AutoTokenizer.from_pretrained(TINY / "reward"))


def test_a_judge_input_over_the_limit_is_scored_on_its_last_tokens_and_counted(reward):
    """Mutant: ``RewardModelScorer`` truncates on the right (keeping the prompt, losing the response)
    or miscounts. (Found by this test: transformers 5 ignores ``truncation_side=`` as a call argument,
    so the scorer cut on the right; it now sets the tokenizer's attribute for the call and restores it.) A text of n tokens under a limit L = n - 6 scores as its last L tokens alone and
    counts 1; a text of exactly L tokens is not cut and not counted."""
    model, tokenizer = reward
    side = tokenizer.truncation_side
    prompt, response = "Tell me about the market.", "The market is lovely and calm, bright and kind."
    ids = tokenizer(RewardModelScorer(model, tokenizer).render(prompt, response), add_special_tokens=False).input_ids
    limit = len(ids) - 6

    scorer = RewardModelScorer(model, tokenizer, max_length=limit)
    score = scorer([prompt], [response])
    with torch.no_grad():
        last = reward_scores(model, torch.tensor([ids[-limit:]]), torch.ones(1, limit, dtype=torch.long))
        first = reward_scores(model, torch.tensor([ids[:limit]]), torch.ones(1, limit, dtype=torch.long))
    torch.testing.assert_close(score, last, rtol=0, atol=1e-5)               # one row, the same tokens
    assert (first - last).abs().item() > 1e-3                                # the side matters here
    assert scorer.truncated == 1

    exact = RewardModelScorer(model, tokenizer, max_length=len(ids))
    with torch.no_grad():
        whole = reward_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    torch.testing.assert_close(exact([prompt], [response]), whole, rtol=0, atol=1e-5)
    assert exact.truncated == 0
    assert tokenizer.truncation_side == side                                 # the caller's tokenizer as it was


# --------------------------------------------------------------------------------------
# resume: a half-written metrics line
# --------------------------------------------------------------------------------------
def test_a_half_written_metrics_line_is_dropped_on_resume_with_a_warning(sentiment, tmp_path):
    """Mutant: ``_open_metrics`` does not catch a half-written last line (it fails on it, keeps it, or
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
