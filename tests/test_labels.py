"""Preference labels: rules, tie rule, reward model with its own tokenizer, implicit reward."""
import copy
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sail_min.data import load_preference_data
from sail_min.labels import (
    PairLabels,
    RewardModelScorer,
    choose,
    dataset_labels,
    implicit_reward_labels,
    length_batches,
    reward_model_labels,
    reward_scores,
)
from types import SimpleNamespace
from sail_min.config import ROUTES, SAILConfig
from sail_min.train import PairLogps, StepPairs, Task, label_pairs

PR = ROUTES.index("pr")
TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
PROMPTS = ["Tell me about the market.",
           [{"role": "user", "content": "Say something about a blue kite."}],
           "Describe the harbor in a few words."]
RESPONSES = ["The market is lovely and calm.", "I hate a blue kite. Go away.",
             "Thank you for asking! The harbor is wonderful, bright, kind and full of life."]


@pytest.fixture(scope="module")
def reward_model():
    return AutoModelForSequenceClassification.from_pretrained(TINY / "reward").eval()


@pytest.fixture(scope="module")
def reward_tokenizer():
    return AutoTokenizer.from_pretrained(TINY / "reward")


def test_argmax_rule_and_tie_goes_to_first():
    labels = choose(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0]), rule="argmax")
    assert labels.first_is_chosen.tolist() == [True, False, True]      # last pair: a tie


def test_bernoulli_rule_follows_bradley_terry():
    margin = math.log(3.0)                                             # sigma(log 3) = 3/4
    n = 20_000
    labels = choose(torch.full((n,), margin), torch.zeros(n), rule="bernoulli",
                    generator=torch.Generator().manual_seed(0))
    frequency = labels.first_is_chosen.float().mean().item()
    assert abs(frequency - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)     # within 4 standard errors
    again = choose(torch.full((n,), margin), torch.zeros(n), rule="bernoulli",
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.first_is_chosen, labels.first_is_chosen)


def test_unknown_rule_and_bad_shapes_are_named():
    with pytest.raises(ValueError, match="rule"):
        choose(torch.zeros(2), torch.zeros(2), rule="max")
    with pytest.raises(ValueError, match="shapes"):
        choose(torch.zeros(2), torch.zeros(3))


def test_dataset_labels_and_reordering():
    labels = dataset_labels(3)
    assert labels.first_is_chosen.all() and labels.first_scores is None
    mixed = PairLabels(torch.tensor([True, False]))
    first, second = torch.tensor([[1, 1], [2, 2]]), torch.tensor([[3, 3], [4, 4]])
    chosen, rejected = mixed.chosen_rejected(first, second)
    assert chosen.tolist() == [[1, 1], [4, 4]] and rejected.tolist() == [[3, 3], [2, 2]]
    assert mixed.chosen_rejected(["a", "b"], ["c", "d"]) == (["a", "d"], ["c", "b"])


def test_reward_callable():
    def longer_is_better(prompts, responses):
        return [float(len(r)) for r in responses]
    labels = reward_model_labels(longer_is_better, ["x", "x", "x"], ["ab", "a", "abc"], ["a", "ab", "xyz"])
    assert labels.first_is_chosen.tolist() == [True, False, True]     # tie -> first
    assert labels.first_scores.tolist() == [2.0, 1.0, 3.0]


def test_reward_model_tokenizer_differs_from_the_policy(reward_tokenizer):
    policy_tokenizer = AutoTokenizer.from_pretrained(TINY / "policy")
    text = RESPONSES[0]
    assert policy_tokenizer(text).input_ids != reward_tokenizer(text).input_ids
    assert reward_tokenizer.pad_token_id == reward_tokenizer.eos_token_id      # the pad == eos trap
    assert reward_tokenizer.padding_side == "left"                            # the padding-side trap


def test_padded_batch_scores_equal_each_text_alone(reward_model, reward_tokenizer):
    scorer = RewardModelScorer(reward_model, reward_tokenizer, batch_size=8)
    batched = scorer(PROMPTS, RESPONSES)
    alone = torch.cat([scorer([p], [r]) for p, r in zip(PROMPTS, RESPONSES)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert reward_tokenizer.padding_side == "left"                            # not mutated


def test_length_batches_group_similar_lengths_in_batches_of_at_most_batch_size():
    lengths = [40, 3000, 12, 45, 41, 2900, 13, 80, 40]
    batches = length_batches(lengths, batch_size=2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))   # every text once
    assert batches == [[2, 6], [0, 8], [4, 3], [7], [5, 1]]          # shortest first; ties in their order
    for batch in batches:
        assert len(batch) <= 2 and max(lengths[i] for i in batch) <= 2 * min(lengths[i] for i in batch)
    assert length_batches(lengths, batch_size=32) == [[2, 6], [0, 8, 4, 3, 7], [5, 1]]   # 80 <= 2 x 40
    assert length_batches([], 8) == [] and length_batches([0, 0, 1], 8) == [[0, 1, 2]]


def test_long_and_short_texts_score_in_the_given_order(reward_model, reward_tokenizer):
    """Texts are batched by length, not in the given order: each score still belongs to its text, equal to the
    text scored alone, and a batch is padded to a similar length (a long answer does not pad the others)."""
    long_answer = " ".join([RESPONSES[2]] * 30)
    prompts, responses = PROMPTS + PROMPTS, RESPONSES + [long_answer, RESPONSES[0], long_answer]
    scorer = RewardModelScorer(reward_model, reward_tokenizer, batch_size=2)
    widths = []
    original = reward_model.base_model.forward
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reward_model.base_model, "forward",
                      lambda input_ids, **kwargs: widths.append(input_ids.shape[1]) or original(input_ids, **kwargs))
        batched = scorer(prompts, responses)
    alone = torch.cat([scorer([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert len(widths) == 3 and sorted(widths)[:2] == widths[:2] and widths[-1] > 5 * widths[0]
    assert scorer([], []).shape == (0,)


def test_scores_read_the_last_real_token_even_when_it_is_eos(reward_model, reward_tokenizer):
    """The model's own pooling looks for the last id != pad_token_id: with pad == eos it skips
    the closing EOS. Reading by attention mask must give the hidden state of the true last token."""
    scorer = RewardModelScorer(reward_model, reward_tokenizer)
    text = scorer.render(PROMPTS[0], RESPONSES[0])
    ids = reward_tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0, -1] == reward_tokenizer.eos_token_id
    with torch.no_grad():
        hidden = reward_model.base_model(input_ids=ids).last_hidden_state
        at_last_token = reward_model.score(hidden[:, -1])[:, 0]
        at_token_before = reward_model.score(hidden[:, -2])[:, 0]
        ours = reward_scores(reward_model, ids, torch.ones_like(ids))
        hf_pooled = reward_model(input_ids=ids).logits[:, 0]
    torch.testing.assert_close(ours, at_last_token, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_pooled, at_token_before, atol=1e-5, rtol=0)   # the trap, shown
    assert (hf_pooled - ours).abs().item() > 1e-3


def test_reward_model_uses_its_own_chat_template(reward_model, reward_tokenizer):
    scorer = RewardModelScorer(reward_model, reward_tokenizer)
    assert scorer.render("Hi", "Hello") == "user: Hi\nassistant: Hello\n</s>"
    plain = copy.deepcopy(reward_tokenizer)
    plain.chat_template = None
    assert RewardModelScorer(reward_model, plain).render("Hi ", "Hello") == "Hi Hello"


def test_a_batch_is_rendered_as_each_pair_alone(reward_model, reward_tokenizer):
    """One apply_chat_template call for the batch (the scorer's path) gives each pair's own text, text and
    conversational prompts mixed."""
    scorer = RewardModelScorer(reward_model, reward_tokenizer)
    prompts = ["Hi", [{"role": "user", "content": "Tell me about the market."}], "Bye"]
    responses = ["Hello", "Calm.", [{"role": "assistant", "content": "See you."}]]
    assert scorer.render_all(prompts, responses) == [scorer.tokenizer.apply_chat_template(
        ([{"role": "user", "content": p}] if isinstance(p, str) else p)
        + ([{"role": "assistant", "content": r}] if isinstance(r, str) else r), tokenize=False)
        for p, r in zip(prompts, responses)]
    assert scorer.render_all([], []) == []


def test_fixture_reward_model_prefers_chosen_on_heldout_pairs(reward_model, reward_tokenizer):
    pairs = load_preference_data(TINY / "preferences.jsonl")
    labels = reward_model_labels(RewardModelScorer(reward_model, reward_tokenizer),
                                 pairs["prompt"], pairs["chosen"], pairs["rejected"])
    assert labels.first_is_chosen.float().mean() >= 0.9


def test_implicit_reward_labels():
    policy_first, ref_first = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0])
    policy_second = torch.tensor([-9.0, -4.0], requires_grad=True)
    ref_second = torch.tensor([-9.5, -6.0])
    labels = implicit_reward_labels(policy_first, policy_second, ref_first, ref_second, beta=0.1, rule="argmax")
    torch.testing.assert_close(labels.first_scores, 0.1 * (policy_first - ref_first))  # beta (l - l_ref)
    torch.testing.assert_close(labels.second_scores, 0.1 * (policy_second - ref_second).detach())
    assert labels.first_is_chosen.tolist() == [True, False]                          # 0.2 > 0.05; 0 < 0.2
    assert not labels.second_scores.requires_grad


def test_conversational_rows_score_like_plain_ones(reward_model, reward_tokenizer):
    scorer = RewardModelScorer(reward_model, reward_tokenizer)
    as_messages = scorer([[{"role": "user", "content": PROMPTS[0]}]], [[{"role": "assistant", "content": RESPONSES[0]}]])
    torch.testing.assert_close(as_messages, scorer([PROMPTS[0]], [RESPONSES[0]]))


# ---- the judge's Bradley-Terry temperature divides the scores ------------------------------
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


# ---- the judge's length limit: cut from the start, counted ---------------------------------
@pytest.fixture(scope="module")
def reward_pair(reward_model, reward_tokenizer):
    return reward_model, reward_tokenizer


def test_a_judge_input_over_the_limit_is_scored_on_its_last_tokens_and_counted(reward_pair):
    """Mutant: ``RewardModelScorer`` truncates on the right (keeping the prompt, losing the response)
    or miscounts. (Found by this test: transformers 5 ignores ``truncation_side=`` as a call argument,
    so the scorer cut on the right; it now sets the tokenizer's attribute for the call and restores it.) A text of n tokens under a limit L = n - 6 scores as its last L tokens alone and
    counts 1; a text of exactly L tokens is not cut and not counted."""
    model, tokenizer = reward_pair
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
