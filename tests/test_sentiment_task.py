"""The sentiment toy task: judge, shipped base model, prompts and preference pairs.

Checks properties of the files in data/sentiment/ (built by
`python data/make_sentiment_task.py`), offline; runs in a few seconds on CPU.
"""
import json
import math
import random

import pytest
import torch

from sail_min.lab.sentiment import (
    BT_TEMPERATURE,
    VaderJudge,
    bradley_terry_choose_first,
    label_agreement,
    load_base_model,
    load_sentiment_task,
    read_jsonl,
)

POSITIVE = ["the food was really great and the staff was friendly !",
            "i loved the room . would recommend .",
            "excellent battery , wonderful screen ."]
NEGATIVE = ["the food was terrible and the staff was rude .",
            "i hated the room . avoid it .",
            "the battery was bad , awful screen ."]


@pytest.fixture(scope="module")
def task():
    return load_sentiment_task()


@pytest.fixture(scope="module")
def base(task):
    model, tokenizer = load_base_model(task.base_model_path)
    return model, tokenizer


@pytest.fixture(scope="module")
def base_samples(task, base):
    """64 samples of the base policy on eval prompts with its saved generation config."""
    model, tok = base
    prompts = task.eval_prompts[:64]
    torch.manual_seed(0)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**enc)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    return prompts, new


# --------------------------------------------------------------------------- judge
def test_judge_is_deterministic_and_ranks_positive_above_negative():
    judge = VaderJudge()
    prompts = ["review of the cafe :"] * 3
    pos, neg = judge(prompts, POSITIVE), judge(prompts, NEGATIVE)
    assert min(pos) > 0.3 and max(neg) < -0.3, (pos, neg)
    assert judge(prompts, POSITIVE) == pos and VaderJudge()(prompts, POSITIVE) == pos
    assert judge(["x"], ["the room was quiet ."]) == [0.0]  # neutral words score 0
    assert all(isinstance(r, float) and -1 < r < 1 for r in pos + neg)


def test_judge_scores_the_response_only():
    judge = VaderJudge()
    assert judge(["terrible awful prompt :"], ["good ."]) == judge(["fine prompt :"], ["good ."])


def test_judge_rejects_bad_arguments():
    judge = VaderJudge()
    with pytest.raises(ValueError, match="len\\(prompts\\)=2"):
        judge(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="responses must be a list"):
        judge(["a"], "c")
    with pytest.raises(TypeError, match=r"responses\[0\]"):
        judge(["a"], [None])


def test_bradley_terry_label_probability():
    """Empirical P(first chosen) matches sigmoid((r1 - r2) / tau)."""
    rng, n = random.Random(0), 4000
    for gap in (0.0, 0.1, -0.2):
        freq = sum(bradley_terry_choose_first(gap, 0.0, 0.1, rng) for _ in range(n)) / n
        assert abs(freq - 1 / (1 + math.exp(-gap / 0.1))) < 0.03, (gap, freq)
    assert bradley_terry_choose_first(1.0, -1.0, 0.1, rng)  # p = 1 - 2e-9
    with pytest.raises(ValueError, match="tau"):
        bradley_terry_choose_first(0.0, 0.0, 0.0, rng)


# --------------------------------------------------------------------------- files
def test_prompts_are_disjoint_prompt_only_files(task):
    assert len(task.train_prompts) >= 500 and len(task.eval_prompts) >= 100
    assert not set(task.train_prompts) & set(task.eval_prompts)
    assert len(set(task.train_prompts)) == len(task.train_prompts)
    for path in (task.train_prompts_path, task.eval_prompts_path):
        rows = read_jsonl(path)
        assert all(set(r) == {"prompt"} and r["prompt"].endswith(":") for r in rows)


def test_missing_root_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="root="):
        load_sentiment_task(tmp_path / "nope")


def test_preference_file_is_valid_and_agrees_with_judge(task, base):
    _, tok = base
    rows = task.preferences()
    assert len(rows) == len(task.train_prompts)
    assert [r["prompt"] for r in rows] == task.train_prompts
    for r in rows:
        assert list(r) == ["prompt", "chosen", "rejected"]
        assert all(isinstance(r[k], str) and r[k].strip() for k in r), r
    assert sum(r["chosen"] != r["rejected"] for r in rows) >= 0.95 * len(rows)
    # every word is in the vocabulary, and text survives encode -> decode unchanged
    texts = [r["chosen"] for r in rows[:100]] + [r["rejected"] for r in rows[:100]]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert all(tok.unk_token_id not in x for x in ids)
    assert tok.batch_decode(ids) == texts
    # Bradley-Terry labels at tau = 0.1 agree with the judge far more often than chance
    agree, n = label_agreement(rows, task.judge)
    assert n >= 0.9 * len(rows)
    assert agree > 0.8, agree  # chance is 0.5; binomial sd at n ~ 650 is 0.02
    card = json.loads((task.root / "card.json").read_text())
    assert card["preferences"]["tau"] == BT_TEMPERATURE == task.bt_temperature
    assert card["preferences"]["label_agreement_with_judge"] == round(agree, 4)


# --------------------------------------------------------------------------- base model
def test_base_model_and_tokenizer_load_offline(base):
    model, tok = base
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert tok("review of the cafe :")["input_ids"][0] == tok.bos_token_id
    gc = model.generation_config
    assert gc.do_sample and gc.temperature == 1.0 and gc.top_k == 0 and gc.top_p == 1.0
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_base_model_ends_with_eos_and_writes_varied_text(base, base_samples):
    _, tok = base
    prompts, new = base_samples
    ended = [tok.eos_token_id in row for row in new]
    assert sum(ended) >= 0.9 * len(new)
    lengths = [row.index(tok.eos_token_id) for row in new if tok.eos_token_id in row]
    assert 4 <= sum(lengths) / len(lengths) <= 20
    texts = tok.batch_decode(new, skip_special_tokens=True)
    assert len(set(texts)) >= 0.8 * len(texts)
    # judge rewards spread in both directions, so there is room to improve
    r = torch.tensor(VaderJudge()(prompts, texts))
    assert r.std() > 0.3 and -0.3 < r.mean() < 0.3, (r.mean(), r.std())
    assert (r > 0.3).float().mean() > 0.2 and (r < -0.3).float().mean() > 0.2


def test_importing_the_tasks_does_not_import_vader():
    """vaderSentiment is loaded when a judge is built, not when sail_min.lab.sentiment is imported."""
    import subprocess
    import sys
    code = ("import sys, sail_min.lab.sentiment, sail_min.lab.sentiment; "
            "assert not any(m.startswith('vaderSentiment') for m in sys.modules), 'vader imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------- judge budget
def test_every_main_job_method_spends_the_same_expected_judge_budget_except_iterative_dpo():
    """Expected loop queries (2 per judged pair: route_pr x rounds x pairs_per_step pairs, one round of pairs every
    reuse_steps steps) plus 2 per
    dataset pair the trimmed task leaves: the budget rule of task_for_method and judge_budget, without training."""
    from sail_min.config import SAILConfig
    from sail_min.lab.compare import method_name
    from sail_min.lab.experiments import METHODS
    from sail_min.lab.sentiment import judge_budget, sentiment_task, task_for_method

    task, default = sentiment_task(), SAILConfig()
    equal = 2 * default.steps * default.pairs_per_step
    for method in METHODS:
        label, preset, overrides = method_name(method)
        config = SAILConfig.preset(preset, **overrides)
        rounds = math.ceil(config.steps / config.reuse_steps)
        expected_loop = 2 * config.route_pr * rounds * config.pairs_per_step
        budget = judge_budget(config, expected_loop, len(task_for_method(task, config).preferences))
        if label == "iterative-dpo":
            assert budget == 2 * 11 * 16 == 352, label                # 11 labelled rounds of 16 pairs in 42 steps
        else:
            assert abs(budget - equal) <= 1, (label, budget)       # SAIL-PR: the expected pairs, rounded
