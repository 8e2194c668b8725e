"""Dress rehearsal of notebook 06's real configuration on its offline stand-ins (issue 25).

`data/make_qwen_standins.py` builds what cannot be downloaded here, with the real things' interfaces:
data/qwen/policy (Qwen2.5-0.5B-Instruct: Qwen2ForCausalLM, ChatML with a default system prompt,
eos <|im_end|>, pad <|endoftext|>, a LIST of EOS ids in generation_config.json), data/qwen/reward
(Skywork-Reward-V2-Qwen3-0.6B: Qwen3ForSequenceClassification with its own tokenizer and Qwen3-style
template) and data/ultrafeedback (trl-lib/ultrafeedback_binarized: implicit-prompt conversations, scores,
answers of thousands of tokens, prompts over 256 tokens). The tests check those interfaces, then the
pieces the real run leans on, then one short run of the README's real command.
"""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from sail_min.__main__ import main
from sail_min.data import load_preference_data
from sail_min.labels import RewardModelScorer
from sail_min.sampling import prompt_length, render_prompts, sample_responses, truncate_prompts_left

ROOT = Path(__file__).resolve().parents[1]
POLICY, REWARD = ROOT / "data" / "qwen" / "policy", ROOT / "data" / "qwen" / "reward"
TRAIN, TEST = ROOT / "data" / "ultrafeedback" / "train.parquet", ROOT / "data" / "ultrafeedback" / "test.parquet"
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and steady on a shared 2-core machine (`train` sets its own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY)


@pytest.fixture(scope="module")
def judge():
    """The judge as notebook 06 builds it (the command line's --judge builds the same)."""
    model = AutoModelForSequenceClassification.from_pretrained(REWARD, dtype=torch.float32)
    return RewardModelScorer(model, AutoTokenizer.from_pretrained(REWARD), batch_size=32)


def user(text):
    return [{"role": "user", "content": text}]


# ---- the stand-ins have the real things' interfaces ---------------------------------------------
def test_policy_has_qwen25_instruct_tokens_template_and_eos_list(tokenizer):
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and tokenizer.bos_token is None
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert GenerationConfig.from_pretrained(POLICY).eos_token_id == [im_end, endoftext]
    assert AutoConfig.from_pretrained(POLICY).vocab_size > len(tokenizer)        # padded embedding rows, as Qwen's
    assert render_prompts(tokenizer, [user("Hi?")]) == [QWEN_SYSTEM + "<|im_start|>user\nHi?<|im_end|>\n"
                                                        "<|im_start|>assistant\n"]


def test_judge_reads_with_its_own_tokenizer_and_qwen3_template(tokenizer, judge):
    config = AutoConfig.from_pretrained(REWARD)
    assert config.architectures == ["Qwen3ForSequenceClassification"] and config.num_labels == 1
    assert config.pad_token_id == judge.tokenizer.pad_token_id != judge.tokenizer.eos_token_id
    assert judge.tokenizer.get_vocab() != tokenizer.get_vocab()                 # not the policy's tokenizer
    text = "The soup was great! Café 😊"
    assert judge.tokenizer(text).input_ids != tokenizer(text).input_ids
    assert judge.render(user("Hi?"), "Hello.") == ("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
                                                   "<think>\n\n</think>\n\nHello.<|im_end|>\n")
    pairs = list(load_preference_data(TEST))[:16]                              # row 7 rejected: 2,350 tokens
    scores = judge([p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    assert (scores[:16] > scores[16:]).all() and judge.truncated == 0


def test_ultrafeedback_rows_are_implicit_prompt_conversations(tokenizer):
    table = pq.read_table(TRAIN)
    assert table.column_names == ["chosen", "rejected", "score_chosen", "score_rejected"]
    assert table.schema.field("score_chosen").type == pa.float64()
    raw = table.to_pylist()
    data = load_preference_data(TRAIN)
    assert data.column_names == ["prompt", "chosen", "rejected"] and len(data) == len(raw) == 300
    for row, parsed in zip(raw[:20], data):
        assert parsed["prompt"] == user(row["chosen"][0]["content"]) and row["score_chosen"] > row["score_rejected"]
        assert parsed["chosen"] == [{"role": "assistant", "content": row["chosen"][1]["content"]}]
        assert parsed["rejected"] == [{"role": "assistant", "content": row["rejected"][1]["content"]}]
    longest = max(len(tokenizer(m["content"]).input_ids) for row in raw for m in row["chosen"] + row["rejected"])
    assert longest > 2000                                                      # answers of thousands of tokens
    assert sum(prompt_length(tokenizer, row["prompt"]) > 256 for row in data) > 10


# ---- the pieces the real run leans on ----------------------------------------------------------
def test_samples_stop_at_either_eos_id_of_the_generation_config(tokenizer):
    """Qwen2.5-Instruct's tokenizer names one EOS (<|im_end|>), its generation config two: a sample that ends
    with <|endoftext|> (also the pad token) has ended, and that EOS is one of its tokens."""
    policy = AutoModelForCausalLM.from_pretrained(POLICY, dtype=torch.float32)
    prompts = [row["prompt"] for row in load_preference_data(TEST)][:16]
    samples = sample_responses(policy, tokenizer, prompts, k=2, max_new_tokens=128, seed=0)
    last = samples.response_ids[torch.arange(len(samples)), samples.lengths - 1]
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert samples.contains_eos.float().mean() > 0.5
    assert set(last[samples.contains_eos].tolist()) == {im_end, endoftext}
    assert torch.equal(samples.response_mask.sum(dim=1), samples.lengths)
    assert not any("<|" in text for text in samples.texts)


def test_long_prompts_are_cut_from_the_left_to_the_templates_length(tokenizer):
    long = [row["prompt"] for row in load_preference_data(TRAIN) if prompt_length(tokenizer, row["prompt"]) > 256]
    cut, count = truncate_prompts_left(tokenizer, long, 256)
    assert count == len(long) and all(prompt_length(tokenizer, p) <= 256 for p in cut)
    for before, after in zip(long, cut):
        text = render_prompts(tokenizer, [after])[0]
        assert text.startswith(QWEN_SYSTEM)                                    # the template is never cut
        assert before[0]["content"].endswith(after[0]["content"])              # the question at the end is kept


# ---- the README's real command, few steps ------------------------------------------------------
def test_cli_runs_the_real_configuration_on_the_standins(tokenizer, tmp_path, monkeypatch):
    """README "Your own model" / notebook 06's settings (LoRA 16, lr 5e-5, 128 new tokens, prompts cut at 256
    and dataset answers at 256 tokens, 8 pairs per step, gradient checkpointing, static cache) in fp32, 2
    steps. Training rows: the stand-in's rows with a prompt or an answer over 256 tokens, so every draw
    meets them."""
    monkeypatch.chdir(ROOT)
    rows = pq.read_table(TRAIN).to_pylist()
    long = [row for row in rows if prompt_length(tokenizer, row["chosen"][:1]) > 256
            or max(len(tokenizer(row[k][1]["content"]).input_ids) for k in ("chosen", "rejected")) > 256]
    data = tmp_path / "long.parquet"
    pq.write_table(pa.Table.from_pylist(long, schema=pq.read_schema(TRAIN)), data)
    out = tmp_path / "run"
    settings = ["lr=5e-5", "max_new_tokens=128", "max_prompt_tokens=256", "max_completion_tokens=256",
                "pairs_per_step=8", "eval_prompts=8", "eval_every=2", "gradient_checkpointing=true",
                "generation_cache=static"]
    assert main(["train", "--model", str(POLICY), "--lora-rank", "16", "--data", str(data), "--eval-data", str(TEST),
                 "--judge", str(REWARD), "--preset", "sail-pr", "--steps", "2", "--out", str(out),
                 *[arg for setting in settings for arg in ("--set", setting)]]) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = history[-1]
    assert last["truncated_prompts"] > 0 and last["truncated_responses"] > 0    # cut and counted
    assert last["skipped_steps"] == 0 and last["judge_queries"] > 0 and last["judge_truncated_inputs"] == 0
    online = [row["online/contains_eos"] for row in history if row["online/contains_eos"] is not None]
    assert online and min(online) > 0.5                                       # samples end at an EOS of the list
    assert last["eval/contains_eos"] > 0.5 and 0 <= last["eval/win_rate"] <= 1
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in history)
