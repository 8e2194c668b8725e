"""Build the toy sentiment task in data/sentiment/ (seeded, offline, ~2 min on one CPU core).

    python data/make_sentiment_task.py            # writes data/sentiment/
    python data/make_sentiment_task.py --out DIR  # elsewhere

Steps (each one a function below):
 1. prompts  : "review of the {modifier} {noun} :" (and "my review of ...", "thoughts
               on ...") for every combination: 840 prompts over 28 items in 3
               categories (food, stay, product), split at random (seeded) into
               disjoint train (672) / eval (168) sets. Eval prompts are new
               combinations of words the model has seen.
 2. corpus   : for train prompts only, a short review from a small grammar. A latent
               mood (positive 35 %, negative 35 %, neutral 15 %, mixed "X but Y" 15 %)
               picks words from positive, negative and neutral word lists, so the
               judge (VADER) sees a real spread of sentiment with mean near 0. Some
               negative words ("stale", "cold", "slow", "overpriced", "would not
               come back") are invisible to VADER on purpose: the judge is a proxy.
 3. tokenizer: word level (punctuation is a word), <pad> <unk> <bos> <eos>, pad != eos.
 4. base     : a tiny LlamaForCausalLM trained by next-token cross-entropy on the
               response tokens and EOS (prompt tokens are context only):
                   L = -mean_{t in response+EOS} log p(y_t | x, y_<t)
 5. measure  : judge reward of base samples (temperature 1) on eval prompts, EOS rate.
 6. pairs    : 2 samples per train prompt (plain model.generate, do_sample, T=1,
               seeded), labelled by Bradley-Terry on judge scores:
                   P(sample 1 is chosen) = sigmoid((r1 - r2) / tau),  tau = 0.1
               with a seeded RNG; written in TRL format {"prompt","chosen","rejected"}.

Outputs: base/ (safetensors + tokenizer + generation_config), train_prompts.jsonl,
eval_prompts.jsonl, preferences.jsonl, card.json (recipe + measured statistics; no
timings, so two runs write identical files).

Reproducibility: python `random` and torch are seeded, data order comes from a seeded
torch.Generator, torch runs 1 thread with deterministic algorithms. Two runs on the
same machine and torch version give byte-identical files; another torch version, BLAS
or CPU may change float rounding in training and hence the sampled text (the recipe
and the statistics stay the same up to noise).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
    os.environ.setdefault(_name, "1")  # never reach a hub; no progress bars
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: make `sail_min` importable
from sail_min.lab.sentiment import (  # noqa: E402
    BT_TEMPERATURE, VaderJudge, bradley_terry_choose_first, label_agreement)

# ----------------------------------------------------------------------------- grammar
# category -> (nouns, modifiers, aspects). Aspects are singular ("the X was ...").
CATEGORIES = {
    "food": (
        ["pizza place", "cafe", "bakery", "diner", "burger bar", "sushi bar", "noodle shop",
         "tea house", "food truck", "steak house"],
        ["new", "old", "small", "big", "local", "corner", "downtown", "family", "busy", "quiet"],
        ["food", "service", "staff", "coffee", "bread", "menu", "waiter", "dessert", "music",
         "soup", "pasta", "decor"],
    ),
    "stay": (
        ["hotel", "hostel", "motel", "inn", "campsite", "guest house", "resort", "lodge"],
        ["new", "old", "small", "big", "local", "seaside", "downtown", "family", "city", "mountain"],
        ["room", "bed", "shower", "staff", "view", "breakfast", "wifi", "pool", "location",
         "lobby", "service"],
    ),
    "product": (
        ["phone", "laptop", "backpack", "headphones", "blender", "camera", "jacket", "lamp",
         "keyboard", "kettle"],
        ["new", "old", "small", "big", "black", "white", "blue", "red", "grey", "green"],
        ["battery", "screen", "sound", "design", "price", "quality", "size", "color", "delivery",
         "box", "handle", "case"],
    ),
}
PROMPT_FORMATS = ["review of the {item} :", "my review of the {item} :", "thoughts on the {item} :"]

# VADER compound of each word alone: positives +0.42..+0.64, negatives -0.32..-0.56.
POSITIVE = ["great", "good", "excellent", "amazing", "wonderful", "lovely", "perfect",
            "fantastic", "nice", "pleasant", "awesome", "superb"]
NEGATIVE_SEEN = ["bad", "terrible", "awful", "horrible", "poor", "disappointing", "nasty",
                 "weak", "ugly", "boring"]
NEGATIVE_UNSEEN = ["cold", "stale", "slow", "overpriced"]  # negative to a reader, 0 to VADER
NEUTRAL = ["quiet", "busy", "small", "large", "simple", "typical", "standard", "plain",
           "average", "usual", "normal", "ordinary"]
BOOSTERS = ["very", "really", "extremely", "so", "quite"]
VERBS = {+1: ["loved", "liked", "enjoyed"], -1: ["hated", "disliked"], 0: ["tried", "noticed", "checked"]}
CLOSERS = {
    +1: ["would recommend", "highly recommend", "overall great", "love it", "would come back",
         "five stars"],
    -1: ["would not recommend", "avoid it", "a waste of money", "overall terrible", "never again",
         "would not come back", "one star"],
    0: ["nothing special", "it was fine", "three stars", "overall ok", "it was okay"],
}
MOODS, MOOD_WEIGHTS = ["positive", "negative", "neutral", "mixed"], [0.35, 0.35, 0.15, 0.15]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids 0..3


def adjective(rng: random.Random, polarity: int, judge_visible: bool = False) -> str:
    """A random adjective of the given polarity (+1, -1, 0)."""
    if polarity > 0:
        return rng.choice(POSITIVE)
    if polarity < 0:
        pool = NEGATIVE_SEEN if judge_visible else NEGATIVE_SEEN + NEGATIVE_UNSEEN
        return rng.choice(pool)
    return rng.choice(NEUTRAL)


def clause(rng: random.Random, polarity: int, subject: str) -> str:
    """One clause about `subject` with the given polarity, in one of four forms."""
    forms = ["was", "verb", "short"] + (["not"] if polarity != 0 else [])
    form = rng.choices(forms, weights=[0.5, 0.2, 0.15, 0.15][: len(forms)])[0]
    if form == "was":
        boost = rng.choice(BOOSTERS) + " " if polarity != 0 and rng.random() < 0.3 else ""
        return f"the {subject} was {boost}{adjective(rng, polarity)}"
    if form == "not":  # "not great" is negative, "not bad" positive (VADER negation)
        return f"the {subject} was not {adjective(rng, -polarity, judge_visible=True)}"
    if form == "verb":
        return f"i {rng.choice(VERBS[polarity])} the {subject}"
    return f"{adjective(rng, polarity)} {subject}"


def review(rng: random.Random, category: str, noun: str) -> str:
    """A short review (the response) for an item of `category` called `noun`."""
    aspects = CATEGORIES[category][2]
    s1, s2 = rng.sample(aspects, 2)
    if rng.random() < 0.15:
        s1 = noun  # sometimes talk about the item itself: uses the prompt
    mood = rng.choices(MOODS, weights=MOOD_WEIGHTS)[0]
    if mood in ("positive", "negative"):
        sign = 1 if mood == "positive" else -1
        text = clause(rng, sign, s1)
        if rng.random() < 0.5:
            joiner = rng.choice(["and", "and", ","])
            text += f" {joiner} " + clause(rng, sign if rng.random() < 0.75 else 0, s2)
        text += " !" if rng.random() < 0.3 else " ."
        closer_sign = sign
    elif mood == "neutral":
        text = clause(rng, 0, s1)
        if rng.random() < 0.4:
            text += " and " + clause(rng, 0, s2)
        text += " ."
        closer_sign = 0
    else:  # mixed: VADER weighs the clause after "but" 1.5x, the one before 0.5x
        sign = rng.choice([1, -1])
        text = clause(rng, sign, s1) + " but " + clause(rng, -sign, s2) + " ."
        closer_sign = -sign
    if rng.random() < 0.35:
        text += " " + rng.choice(CLOSERS[closer_sign]) + " ."
    return text


def make_prompts(seed: int, eval_fraction: float) -> tuple[list[str], list[str], dict]:
    """All prompts, split at random into disjoint (train, eval); prompt -> (category, noun)."""
    info = {}
    for fmt, (cat, (nouns, mods, _)) in itertools.product(PROMPT_FORMATS, CATEGORIES.items()):
        for noun, mod in itertools.product(nouns, mods):
            info[fmt.format(item=f"{mod} {noun}")] = (cat, noun)
    prompts = list(info)
    random.Random(seed).shuffle(prompts)
    n_eval = round(eval_fraction * len(prompts))
    return prompts[n_eval:], prompts[:n_eval], info


def make_corpus(prompts: list[str], info: dict, n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt, review) pairs, prompts drawn uniformly from `prompts`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.choice(prompts)
        out.append((p, review(rng, *info[p])))
    return out


# ----------------------------------------------------------------------------- tokenizer
def grammar_words() -> list[str]:
    """Every word the prompts or the grammar can produce, sorted (a stable vocabulary)."""
    texts = PROMPT_FORMATS + POSITIVE + NEGATIVE_SEEN + NEGATIVE_UNSEEN + NEUTRAL + BOOSTERS
    texts += [w for v in VERBS.values() for w in v] + [c for v in CLOSERS.values() for c in v]
    for nouns, mods, aspects in CATEGORIES.values():
        texts += nouns + mods + aspects
    texts += ["the", "was", "not", "i", "and", "but", ",", ".", "!"]
    words = {w for t in texts for w in t.replace("{item}", "").split()}
    return sorted(words)


def build_tokenizer():
    """Word-level tokenizer: split on whitespace and punctuation, prepend <bos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + grammar_words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    bos = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", clean_up_tokenization_spaces=False, model_max_length=64)


# ----------------------------------------------------------------------------- model
def build_model(tokenizer, args):
    """A tiny Llama (tied embeddings), fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.d_model, intermediate_size=2 * args.d_model,
        num_hidden_layers=args.n_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=1024, tie_word_embeddings=True,  # rotary: only a limit
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def encode(tokenizer, pairs: list[tuple[str, str]]):
    """Right-padded ids [<bos> x y <eos> <pad>...] and labels (-100 on <bos>, x and pads)."""
    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    responses = tokenizer([y for _, y in pairs], add_special_tokens=False)["input_ids"]
    seqs = [p + y + [tokenizer.eos_token_id] for p, y in zip(prompts, responses)]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), T), -100)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p): len(s)] = torch.tensor(s[len(p):])
    return ids, labels


def train(model, ids, labels, eval_ids, eval_labels, args) -> dict:
    """AdamW, linear warmup then cosine decay; batches from a seeded permutation."""
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = args.steps // 20

    def lr_at(s: int) -> float:  # linear warmup, then cosine from lr down to 0.1 * lr
        if s < warmup:
            return args.lr * (s + 1) / warmup
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / (args.steps - warmup))))

    perm, pos, log = torch.randperm(len(ids), generator=g), 0, {}
    model.train()
    for step in range(args.steps):
        if pos + args.batch_size > len(ids):
            perm, pos = torch.randperm(len(ids), generator=g), 0
        idx = perm[pos: pos + args.batch_size]
        pos += args.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = ids[idx], labels[idx]
        loss = model(input_ids=x, attention_mask=(x != model.config.pad_token_id).long(), labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == args.steps - 1:
            log = {"train_loss": loss.item(), "eval_loss": evaluate(model, eval_ids, eval_labels)}
            print(f"step {step:5d}  train loss {log['train_loss']:.4f}  eval loss {log['eval_loss']:.4f}")
    model.eval()
    return log


@torch.no_grad()
def evaluate(model, ids, labels) -> float:
    """Mean token cross-entropy on held-out (eval-prompt) reviews."""
    was_training = model.training
    model.eval()
    loss = model(input_ids=ids, attention_mask=(ids != model.config.pad_token_id).long(), labels=labels).loss
    model.train(was_training)
    return loss.item()


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], seed: int, batch_size: int = 256):
    """One response per prompt with plain `generate` (the saved generation_config:
    do_sample, T=1, top_k=0, top_p=1). Returns (texts, ended_with_eos, n_tokens)."""
    torch.manual_seed(seed)
    texts, eos, lengths = [], [], []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i: i + batch_size], return_tensors="pt", padding=True,
                        padding_side="left")
        out = model.generate(**enc, generation_config=model.generation_config)
        new = out[:, enc["input_ids"].shape[1]:]
        for row in new.tolist():
            n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            eos.append(tokenizer.eos_token_id in row)
            lengths.append(n)
            texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    return texts, eos, lengths


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, keys in insertion order."""
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def stats(xs: list[float]) -> dict:
    """Mean and (population) standard deviation, rounded for stable files."""
    return {"mean": round(statistics.fmean(xs), 4), "std": round(statistics.pstdev(xs), 4)}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "sentiment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-fraction", type=float, default=0.2)
    ap.add_argument("--corpus-size", type=int, default=40_000)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tau", type=float, default=BT_TEMPERATURE, help="Bradley-Terry temperature")
    ap.add_argument("--n-measure", type=int, default=256, help="base samples for statistics")
    args = ap.parse_args()
    if not 0 < args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")

    t0 = time.time()
    torch.set_num_threads(1)  # one thread: same float reductions on every machine, and
    # on a shared 2-core machine two threads were 10x *slower* (spin-waiting), not faster
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    judge = VaderJudge()

    # 1-2. prompts and corpus (eval reviews only to measure held-out loss)
    train_prompts, eval_prompts, info = make_prompts(args.seed, args.eval_fraction)
    corpus = make_corpus(train_prompts, info, args.corpus_size, args.seed + 1)
    held_out = make_corpus(eval_prompts, info, 2000, args.seed + 2)
    corpus_r = judge([p for p, _ in corpus], [y for _, y in corpus])
    print(f"{len(train_prompts)} train / {len(eval_prompts)} eval prompts; corpus of {len(corpus)} "
          f"reviews, judge reward {stats(corpus_r)}")

    # 3-4. tokenizer and base model
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, model {n_params:,} parameters")
    ids, labels = encode(tokenizer, corpus)
    eval_ids, eval_labels = encode(tokenizer, held_out)
    assert (ids != tokenizer.unk_token_id).all(), "grammar produced a word outside the vocabulary"
    log = train(model, ids, labels, eval_ids, eval_labels, args)
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.max_new_tokens = True, 1.0, 0, 1.0, 24
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)

    # 5. measure the base policy on held-out prompts
    measure_prompts = [eval_prompts[i % len(eval_prompts)] for i in range(args.n_measure)]
    texts, eos, lengths = sample(model, tokenizer, measure_prompts, seed=args.seed + 3)
    base_r = judge(measure_prompts, texts)
    corpus_texts = {y for _, y in corpus}
    base = {
        "n_samples": len(texts), "judge_reward": stats(base_r),
        "eos_fraction": round(sum(eos) / len(eos), 4),
        "mean_response_tokens": round(statistics.fmean(lengths), 2),
        "distinct_fraction": round(len(set(texts)) / len(texts), 4),
        "in_corpus_fraction": round(sum(t in corpus_texts for t in texts) / len(texts), 4),
    }
    print(f"base samples: {base}")

    # 6. preference pairs on train prompts, Bradley-Terry labels from the judge
    pair_prompts = [p for p in train_prompts for _ in range(2)]
    ptexts, peos, _ = sample(model, tokenizer, pair_prompts, seed=args.seed + 4)
    pr = judge(pair_prompts, ptexts)
    rng = random.Random(args.seed + 5)
    rows = []
    for k, p in enumerate(train_prompts):
        (y1, y2), (r1, r2) = ptexts[2 * k: 2 * k + 2], pr[2 * k: 2 * k + 2]
        first = bradley_terry_choose_first(r1, r2, args.tau, rng)
        rows.append({"prompt": p, "chosen": y1 if first else y2, "rejected": y2 if first else y1})
    agree, n_decided = label_agreement(rows, judge)
    expected = statistics.fmean(1 / (1 + math.exp(-abs(a - b) / args.tau))
                                for a, b in zip(pr[::2], pr[1::2]) if a != b)
    pairs = {
        "n_pairs": len(rows), "tau": args.tau, "judge_reward_samples": stats(pr),
        "eos_fraction": round(sum(peos) / len(peos), 4),
        "identical_pairs": sum(r["chosen"] == r["rejected"] for r in rows),
        "tied_pairs": len(rows) - n_decided,
        "label_agreement_with_judge": round(agree, 4),
        "expected_agreement": round(expected, 4),
    }
    print(f"preference pairs: {pairs}")

    # write everything
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out / "base", safe_serialization=True)
    tokenizer.save_pretrained(args.out / "base")
    write_jsonl(args.out / "train_prompts.jsonl", [{"prompt": p} for p in train_prompts])
    write_jsonl(args.out / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
    write_jsonl(args.out / "preferences.jsonl", rows)
    card = {
        "task": "continue a review prompt; judge = VADER compound of the response, in (-1, 1)",
        "recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k != "out"},
        "n_train_prompts": len(train_prompts), "n_eval_prompts": len(eval_prompts),
        "vocab_size": len(tokenizer), "n_params": n_params,
        "corpus_judge_reward": stats(corpus_r),
        "final_loss": {k: round(v, 4) for k, v in log.items()},
        "base_samples_eval_prompts": base, "preferences": pairs,
        "examples": [{"prompt": p, "response": t, "reward": round(r, 4)}
                     for p, t, r in list(zip(measure_prompts, texts, base_r))[:8]],
    }
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
