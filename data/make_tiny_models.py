"""Build the tiny, offline fixtures under data/tiny/ (seeded; about a minute on 2 CPU cores).

Nothing is downloaded: the text is generated below from a few templates, the tokenizers
are trained on it with the `tokenizers` library, and the models are randomly initialised
and then trained for a few hundred steps so that their outputs mean something.

What it writes (all loadable with `from_pretrained`, offline):

  data/tiny/policy/   Qwen2ForCausalLM, ~0.1 M parameters, and its tokenizer:
                      byte-level BPE (512 tokens), ChatML chat template,
                      eos = <|im_end|>, pad = <|endoftext|>, padding side "right".
                      Trained by next-token prediction on chat-formatted answers,
                      half of them polite and half rude:  min_theta -sum_t log pi_theta(x_t | x_<t).
  data/tiny/reward/   LlamaForSequenceClassification (one score), ~0.05 M parameters, with a
                      DIFFERENT tokenizer: lower-cased words (a word-level vocabulary), its own plain chat template,
                      pad == eos == </s> (the template ends every conversation with </s>), and
                      padding side "left": the two classic traps for reading a reward model.
                      Trained with the Bradley-Terry loss on (polite, rude) pairs:
                      min_phi -log sigmoid(r_phi(x, y_polite) - r_phi(x, y_rude)).
  data/tiny/preferences.jsonl  held-out (prompt, chosen, rejected) pairs, plain text, on
                      topics that neither model was trained on.
  data/tiny/prompts.jsonl      held-out prompts, conversational ([{"role", "content"}]).

Run from the repository root:  python data/make_tiny_models.py
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from sail_min.labels import reward_scores  # noqa: E402  (the same reading the scorer uses)

OUT_DIR = REPO_ROOT / "data" / "tiny"
SEED = 0

TOPICS = [
    "the sea", "a cat", "the moon", "fresh bread", "the rain", "a garden", "the river",
    "an old book", "the forest", "a warm coat", "the city", "a small dog", "the stars",
    "green tea", "the mountains", "a new song", "the morning", "a red apple", "the winter",
    "a long walk", "the library", "a bicycle", "the sunset", "a good friend", "the wind",
    "a quiet room", "the summer", "hot soup", "the snow", "a paper boat",
    # held out: used only in preferences.jsonl and prompts.jsonl
    "the market", "a blue kite", "the harbor", "a wool hat", "the valley",
    "an open window", "the bakery", "a soft pillow", "the meadow", "a lantern",
]
NUM_TRAIN_TOPICS = 30
PROMPTS = [
    "Tell me about {t}.",
    "Describe {t} in a few words.",
    "What do you think of {t}?",
    "Say something about {t}.",
]
POLITE = [
    "{T} is lovely and calm.",
    "I like {t}. It makes me happy.",
    "{T} is bright, kind and full of life.",
    "Thank you for asking! {T} is wonderful.",
    "{T} feels warm and peaceful.",
    "What a nice question. {T} is a small joy.",
]
RUDE = [
    "{T} is awful.",
    "I hate {t}. Go away.",
    "{T} is dull, cold and ugly.",
    "Stop asking me about {t}.",
    "{T} is boring and sad.",
    "Who cares about {t}? Not me.",
]

POLICY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REWARD_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}</s>"
)


def fill(template: str, topic: str) -> str:
    return template.format(t=topic, T=topic[0].upper() + topic[1:])


def make_pairs(topics: list[str], rng: random.Random, pairs_per_topic: int) -> list[dict]:
    """(prompt, chosen = polite, rejected = rude) rows in TRL's plain-text format."""
    rows = []
    for topic in topics:
        for prompt in rng.sample(PROMPTS, pairs_per_topic):
            rows.append({
                "prompt": fill(prompt, topic),
                "chosen": fill(rng.choice(POLITE), topic),
                "rejected": fill(rng.choice(RUDE), topic),
            })
    return rows


def train_policy_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], padding_side="right",
        chat_template=POLICY_CHAT_TEMPLATE, model_max_length=256)


def make_reward_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A lower-cased word-level vocabulary: every word and punctuation mark of `texts`, sorted."""
    splitter = pre_tokenizers.BertPreTokenizer()                 # splits on spaces and punctuation
    words = sorted({word for text in texts for word, _ in splitter.pre_tokenize_str(text.lower())})
    vocab = {token: i for i, token in enumerate(["[UNK]", "</s>"] + words)}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    word_level.normalizer = normalizers.Lowercase()
    word_level.pre_tokenizer = splitter
    word_level.add_special_tokens(["[UNK]", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="[UNK]", eos_token="</s>", pad_token="</s>",
        padding_side="left", chat_template=REWARD_CHAT_TEMPLATE, model_max_length=256)


def chat(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def train_policy(tokenizer, texts: list[str], steps: int = 400, batch_size: int = 32) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        rows = torch.randint(len(texts), (batch_size,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt",
                          add_special_tokens=False)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # no loss on padding
        loss = model(**batch, labels=labels).loss                               # mean_t -log pi(x_t|x_<t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"policy step {step:4d}  next-token loss {loss.item():.3f}")
    return model.eval()


def train_reward_model(tokenizer, pairs: list[dict], steps: int = 300, batch_size: int = 32):
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None)
    model = LlamaForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(SEED + 1)

    def encode(texts):
        return tokenizer(texts, padding=True, padding_side="right", return_tensors="pt",
                         add_special_tokens=False)

    model.train()
    for step in range(steps):
        rows = [pairs[i] for i in torch.randint(len(pairs), (batch_size,), generator=generator)]
        chosen = encode([tokenizer.apply_chat_template(chat(r["prompt"], r["chosen"]), tokenize=False) for r in rows])
        rejected = encode([tokenizer.apply_chat_template(chat(r["prompt"], r["rejected"]), tokenize=False) for r in rows])
        margin = (reward_scores(model, chosen.input_ids, chosen.attention_mask)
                  - reward_scores(model, rejected.input_ids, rejected.attention_mask))
        loss = -torch.nn.functional.logsigmoid(margin).mean()  # Bradley-Terry: -log sigma(r_w - r_l)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"reward step {step:4d}  Bradley-Terry loss {loss.item():.3f}")
    return model.eval()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    hf_logging.disable_progress_bar()   # no "Writing model shards" bars on stderr
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a shared machine
    train_topics, heldout_topics = TOPICS[:NUM_TRAIN_TOPICS], TOPICS[NUM_TRAIN_TOPICS:]
    train_pairs = make_pairs(train_topics, rng, pairs_per_topic=4)
    heldout_pairs = make_pairs(heldout_topics, rng, pairs_per_topic=2)
    raw_text = ([fill(p, t) for t in TOPICS for p in PROMPTS]
                + [fill(r, t) for t in TOPICS for r in POLITE + RUDE])

    policy_tokenizer = train_policy_tokenizer(raw_text)
    reward_tokenizer = make_reward_tokenizer(raw_text + ["system: user: assistant:"])  # + the template's roles

    # Policy data: every train prompt answered once politely and once rudely, in ChatML.
    policy_texts = [
        policy_tokenizer.apply_chat_template(chat(row["prompt"], answer), tokenize=False).rstrip("\n")
        for row in train_pairs for answer in (row["chosen"], row["rejected"])
    ]
    policy = train_policy(policy_tokenizer, policy_texts)
    reward_model = train_reward_model(reward_tokenizer, train_pairs)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, model, tokenizer in [("policy", policy, policy_tokenizer),
                                   ("reward", reward_model, reward_tokenizer)]:
        model.save_pretrained(OUT_DIR / name)
        tokenizer.save_pretrained(OUT_DIR / name)
    write_jsonl(OUT_DIR / "preferences.jsonl", heldout_pairs)
    write_jsonl(OUT_DIR / "prompts.jsonl",
                [{"prompt": [{"role": "user", "content": fill(p, t)}]}
                 for t in heldout_topics for p in PROMPTS[:2]])
    total_bytes = sum(f.stat().st_size for f in OUT_DIR.rglob("*") if f.is_file())
    print(f"wrote {OUT_DIR.relative_to(REPO_ROOT)}: {total_bytes / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
