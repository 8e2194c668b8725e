"""Build offline stand-ins for notebook 06's real configuration (seeded; ~1.5 min of CPU on 2 cores).

Notebook 06 runs Qwen/Qwen2.5-0.5B-Instruct + LoRA as the policy, Skywork/Skywork-Reward-V2-Qwen3-0.6B as
the judge and trl-lib/ultrafeedback_binarized as data; none of them can be downloaded here. This script
builds tiny models and data with the same *interfaces* (classes, tokenizer classes, special tokens, chat
templates, EOS conventions, dataset schema), so that the real-model code path can be rehearsed on a CPU in
seconds. Nothing is downloaded: the text comes from the toy task's review sentences (data/sentiment/, split
into positive and negative by VADER, the toy task's judge), the tokenizers are trained on it with the
`tokenizers` library, and both models are randomly initialised and trained briefly so that their outputs
mean something.

What it writes (all loadable with `from_pretrained`, offline):

  data/qwen/policy/   Qwen2ForCausalLM (~0.3 M parameters, saved in bf16 like Qwen2.5, with more
                      embedding rows than tokens like Qwen's) and its Qwen2Tokenizer: byte-level BPE
                      with Qwen2's pre-tokenizer, its special tokens appended after the vocabulary in
                      Qwen's order (<|endoftext|>, <|im_start|>, <|im_end|>), no BOS, eos_token =
                      <|im_end|> and pad_token = <|endoftext|> (as Qwen2.5-Instruct ships them),
                      Qwen2.5-Instruct's chat template (ChatML with its
                      default system prompt "You are Qwen, created by Alibaba Cloud. ..."), and a
                      generation_config.json whose eos_token_id is the LIST [<|im_end|>, <|endoftext|>]
                      (pad_token_id <|endoftext|>) with Qwen2.5-Instruct's sampling defaults
                      (temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.1).
                      Trained by next-token prediction on chat-formatted short answers; a quarter of
                      them end with <|endoftext|> instead of <|im_end|>, so its samples stop at either
                      id and only the list in generation_config.json names both.
  data/qwen/reward/   Qwen3ForSequenceClassification (num_labels=1, ~0.15 M parameters, bf16) with ITS
                      OWN tokenizer: another byte-level BPE vocabulary (smaller, its ids permuted: the
                      policy's ids mean nothing to it), Qwen3's special and added tokens (<think>,
                      </think>), a Qwen3-style chat template (no default system prompt; the final
                      assistant turn gets an empty <think>\\n\\n</think>\\n\\n block), pad token
                      <|endoftext|> and pad_token_id in its config. Trained with the Bradley-Terry loss
                      on (chosen, rejected) training pairs: min -log sigmoid(r(x, y_w) - r(x, y_l)).
  data/ultrafeedback/train.parquet, test.parquet
                      trl-lib/ultrafeedback_binarized's schema: `chosen` and `rejected` are
                      conversations [{"content", "role"}: user, assistant] whose shared user turn is
                      the (implicit) prompt, `score_chosen` > `score_rejected` floats (1-10).
                      300 train rows, 50 test rows (2 of whose prompts also occur in train). Some
                      answers are thousands of tokens long and some prompts are longer than 256 tokens
                      (a pasted context), as in UltraFeedback; a few rows carry markdown, code,
                      accents and emoji.

Run from the repository root:  python data/make_qwen_standins.py
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForSequenceClassification,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.utils import logging as hf_logging

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from sail_min.labels import reward_scores  # noqa: E402  (the same reading the scorer uses)

QWEN_DIR = REPO_ROOT / "data" / "qwen"
DATA_DIR = REPO_ROOT / "data" / "ultrafeedback"
SENTIMENT = REPO_ROOT / "data" / "sentiment" / "preferences.jsonl"
SEED = 0
NUM_TRAIN, NUM_TEST, TEST_ALSO_IN_TRAIN = 300, 50, 2

# Qwen2.5-Instruct's chat template (tools branch included): a system message of its own, or the default one.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Qwen3-style (tools branch left out): no default system prompt; an assistant turn after the last user
# query gets a <think> block (empty unless the content carries one); enable_thinking=False adds it to
# the generation prompt.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- if message.role == 'user' and ns.last_query_index == messages|length - 1 %}\n"
    "        {%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- set content = message.content if message.content is string else '' %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if '</think>' in content %}\n"
    "            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}\n"
    "            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}\n"
    "            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>assistant\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]     # Qwen's order (151643, 151644, 151645)
QWEN3_ADDED = ["<think>", "</think>"]                                # Qwen3: added, not special

ASKS = [
    "Write a short review of {t}.",
    "What did you think of {t}?",
    "I am thinking of trying {t}. Would you recommend it?",
    "Describe your experience with {t} in a few sentences.",
    "Give me an honest opinion about {t}.",
    "My friend asked about {t}. What should I tell them?",
]
OPENERS_GOOD = ["Sure! Here is my review of {t}.", "Great question.", "I would recommend {t}.", "Happy to help!"]
OPENERS_BAD = ["Honestly, {t} was a letdown.", "I would not recommend {t}.", "Well.", "Not great, to be honest."]
EXTRAS = ["Café crème was served with a smile 😊.", "Prices were in €, not $.", "Naïve décor, but it works.",
          "The menu said: `open 9:00-17:00`.", "Rating: **4/5**.", "Note: the Wi-Fi password was \"guest123\"."]


# --------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------
def sentence(text: str) -> str:
    """'the soup was great !' -> 'The soup was great!' (the toy corpus is lower-case and spaced)."""
    text = f" {text.strip()} ".replace(" i ", " I ").strip()
    for mark in (" .", " !", " ,", " ?"):
        text = text.replace(mark, mark[1])
    return text[0].upper() + text[1:]


def load_sentences() -> tuple[list[str], list[str], list[str]]:
    """(positive sentences, negative sentences, things reviewed) from the toy task's pairs, split by VADER."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    rows = [json.loads(line) for line in SENTIMENT.read_text().splitlines()]
    texts = sorted({r[k] for r in rows for k in ("chosen", "rejected")})
    positive = [sentence(t) for t in texts if vader.polarity_scores(t)["compound"] >= 0.4]
    negative = [sentence(t) for t in texts if vader.polarity_scores(t)["compound"] <= -0.3]
    things = sorted({r["prompt"].rsplit(" of ", 1)[-1].rsplit(" on ", 1)[-1].rstrip(" :") for r in rows})
    return positive, negative, things


def answer(rng: random.Random, pool: list[str], openers: list[str], thing: str, words: int) -> str:
    """An answer of about `words` words: an opener, then sentences of `pool` in paragraphs."""
    parts, count = [rng.choice(openers).format(t=thing)], 0
    while count < words:
        paragraph = " ".join(rng.choice(pool) for _ in range(rng.randint(2, 5)))
        if rng.random() < 0.15:
            paragraph = "\n".join("- " + s for s in rng.sample(pool, 3))          # a markdown list
        parts.append(paragraph)
        count += len(paragraph.split())
    if rng.random() < 0.1:
        parts.append(rng.choice(EXTRAS))
    return "\n\n".join(parts)


def make_rows(rng: random.Random, positive, negative, things, n: int, used: set[str]) -> list[dict]:
    """n rows in trl-lib/ultrafeedback_binarized's schema, prompts not in `used` (which grows)."""
    rows = []
    while len(rows) < n:
        thing = rng.choice(things)
        prompt = rng.choice(ASKS).format(t=thing)
        if len(rows) % 16 == 5:                                   # a pasted context: > 256 prompt tokens
            notes = " ".join(rng.choice(positive + negative) for _ in range(rng.randint(40, 80)))
            prompt = f"Here are some notes from other customers:\n\n{notes}\n\n{prompt}"
        if prompt in used:
            continue
        used.add(prompt)
        long = len(rows) % 20 == 7                                # thousands of tokens
        lengths = [rng.randint(1500, 3500) if long and rng.random() < 0.7 else rng.randint(10, 120)
                   for _ in range(2)]
        chosen = answer(rng, positive, OPENERS_GOOD, thing, lengths[0])
        rejected = answer(rng, negative, OPENERS_BAD, thing, lengths[1])
        score_chosen = rng.choice([6.5, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0])
        score_rejected = rng.choice([s for s in (1.0, 2.0, 3.0, 4.0, 5.0, 5.5, 6.0) if s < score_chosen])
        user = {"content": prompt, "role": "user"}
        rows.append({"chosen": [user, {"content": chosen, "role": "assistant"}],
                     "rejected": [user, {"content": rejected, "role": "assistant"}],
                     "score_chosen": score_chosen, "score_rejected": score_rejected})
    return rows


# --------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------
def train_bpe(texts: list[str], vocab_size: int) -> tuple[dict, list]:
    """Byte-level BPE with Qwen2's pre-tokenizer; the vocabulary and merges, without special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(bpe.to_str())["model"]
    return state["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]


def make_tokenizer(texts: list[str], vocab_size: int, specials: list[str], added: list[str],
                   chat_template: str, shuffle_ids: random.Random | None = None) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer (the class Qwen2.5 and Qwen3 both use) on a BPE trained on `texts`: special tokens
    after the vocabulary, no BOS, eos <|im_end|>, pad <|endoftext|>, errors='replace'. `shuffle_ids`
    permutes the ids of the trained vocabulary (merges name tokens by text, so the tokenizer is unchanged
    but no token keeps the id it would have in another tokenizer trained the same way)."""
    vocab, merges = train_bpe(texts, vocab_size)
    if shuffle_ids is not None:
        order = sorted(vocab, key=vocab.get)
        shuffle_ids.shuffle(order)
        vocab = {token: i for i, token in enumerate(order)}
    first_special = len(vocab)
    for token in specials + added:                                   # appended, Qwen's way
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=chat_template, model_max_length=131072, errors="replace",
        clean_up_tokenization_spaces=False, split_special_tokens=False, padding_side="right")
    if added:
        tokenizer.add_tokens(added)                                  # Qwen3's <think>, </think>: not special
    assert [tokenizer.convert_tokens_to_ids(t) for t in specials] == list(range(first_special, first_special + 3))
    return tokenizer


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------
def chat(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def padded_vocab(tokenizer, multiple: int = 128) -> int:
    """Embedding rows: len(tokenizer) rounded up, as Qwen's (151,936 rows for 151,665 tokens): a model can
    sample ids that the tokenizer does not have (they decode to nothing)."""
    return -(-len(tokenizer) // multiple) * multiple


def train_policy(tokenizer, texts: list[str], steps: int = 300, batch_size: int = 32) -> Qwen2ForCausalLM:
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    config = Qwen2Config(
        vocab_size=padded_vocab(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
        tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=None, rope_theta=1000000.0)                     # Qwen2.5's config.json: no pad id
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        rows = torch.randint(len(texts), (batch_size,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt", add_special_tokens=False)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)   # no loss on padding
        loss = model(**batch, labels=labels).loss                                # mean_t -log pi(x_t | x_<t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"policy step {step:4d}  next-token loss {loss.item():.3f}")
    model.generation_config = GenerationConfig(                        # Qwen2.5-Instruct's, ids remapped
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=True, temperature=0.7, top_p=0.8,
        top_k=20, repetition_penalty=1.1)
    return model.eval()


def train_reward_model(tokenizer, rows: list[dict], steps: int = 100, batch_size: int = 16,
                       max_tokens: int = 160):
    config = Qwen3Config(
        vocab_size=padded_vocab(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=40960,
        tie_word_embeddings=True, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
        rope_theta=1000000.0)
    model = Qwen3ForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(SEED + 1)

    def encode(conversations):
        # training only: keep the end (the answer's last tokens and the template's) of long texts
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
        ids = [tokenizer(t, add_special_tokens=False).input_ids[-max_tokens:] for t in texts]
        return tokenizer.pad({"input_ids": ids}, padding=True, padding_side="right", return_tensors="pt")

    model.train()
    for step in range(steps):
        batch = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=generator)]
        chosen, rejected = encode([r["chosen"] for r in batch]), encode([r["rejected"] for r in batch])
        margin = (reward_scores(model, chosen.input_ids, chosen.attention_mask)
                  - reward_scores(model, rejected.input_ids, rejected.attention_mask))
        loss = -torch.nn.functional.logsigmoid(margin).mean()  # Bradley-Terry: -log sigma(r_w - r_l)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"reward step {step:4d}  Bradley-Terry loss {loss.item():.3f}")
    return model.eval()


def save_bf16(model, tokenizer, folder: Path) -> None:
    """Weights in bf16, as Qwen2.5 and Skywork-Reward-V2 ship theirs (config.json dtype bfloat16)."""
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    hf_logging.disable_progress_bar()   # no "Writing model shards" bars on stderr
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a shared machine
    positive, negative, things = load_sentences()
    test_things = set(rng.sample(things, len(things) // 5))          # answers about these are never trained on
    used: set[str] = set()
    train = make_rows(rng, positive, negative, [t for t in things if t not in test_things], NUM_TRAIN, used)
    test = make_rows(rng, positive, negative, sorted(test_things), NUM_TEST - TEST_ALSO_IN_TRAIN, used)
    test += [train[i] for i in rng.sample(range(NUM_TRAIN), TEST_ALSO_IN_TRAIN)]   # held out: left out by the CLI

    corpus = [m["content"] for r in train for m in r["chosen"] + r["rejected"][1:]] + EXTRAS
    corpus = [text[:2000] for text in corpus]                          # BPE statistics: long answers capped
    policy_tokenizer = make_tokenizer(corpus + ["You are Qwen, created by Alibaba Cloud. You are a helpful "
                                                "assistant. system user assistant"], 1024, QWEN_SPECIALS, [],
                                      QWEN25_CHAT_TEMPLATE)
    reward_tokenizer = make_tokenizer(corpus + ["system user assistant think"], 640, QWEN_SPECIALS,
                                      QWEN3_ADDED, QWEN3_CHAT_TEMPLATE, shuffle_ids=random.Random(SEED + 2))

    # Policy data: each training prompt answered once (chosen or rejected), the answer cut to its first
    # two paragraphs; ChatML with the default system prompt; a quarter end with <|endoftext|>, not <|im_end|>.
    texts = []
    for i, row in enumerate(train):
        reply = "\n\n".join(row["chosen" if i % 2 else "rejected"][1]["content"].split("\n\n")[:2])
        text = policy_tokenizer.apply_chat_template(chat(row["chosen"][0]["content"][-300:], reply), tokenize=False)
        text = text.rstrip("\n")
        texts.append(text[: -len("<|im_end|>")] + "<|endoftext|>" if i % 4 == 0 else text)
    policy = train_policy(policy_tokenizer, texts)
    reward_model = train_reward_model(reward_tokenizer, train)

    import pyarrow as pa
    import pyarrow.parquet as pq
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema([("chosen", pa.list_(message)), ("rejected", pa.list_(message)),
                        ("score_chosen", pa.float64()), ("score_rejected", pa.float64())])
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), DATA_DIR / f"{name}.parquet", compression="zstd")
    save_bf16(policy, policy_tokenizer, QWEN_DIR / "policy")
    save_bf16(reward_model, reward_tokenizer, QWEN_DIR / "reward")
    for folder in (QWEN_DIR, DATA_DIR):
        total_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"wrote {folder.relative_to(REPO_ROOT)}: {total_bytes / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
