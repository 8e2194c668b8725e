"""Toy task "make the review positive": a tiny base policy, prompts, offline pairs, a judge.

The task
--------
A prompt is the start of a short review, e.g. ``"review of the old pizza place :"``.
The policy continues it with one or two short sentences and EOS, e.g.
``"the crust was really great and the staff was friendly ! would recommend ."``.
Everything is lower-case and whitespace-separated (punctuation is its own word), so
``decode(encode(text)) == text`` for the task's text.

The judge (ground-truth reward, written by a third party)
--------------------------------------------------------
VADER (Hutto & Gilbert 2014, package ``vaderSentiment``, MIT): a hand-built lexicon
of word valences v_w in [-4, 4] plus rules (boosters "very"/"really" add ~0.29,
"not" multiplies the next words by -0.74, the clause after "but" weighs 1.5x and the
one before 0.5x, "!" adds emphasis). The valences are summed to s and squashed:

    r(x, y) = compound(y) = s / sqrt(s^2 + 15)   in (-1, 1).

It is deterministic, offline and fast (~1000 short reviews in 0.1 s). It is also a
*proxy*: it knows "great" and "terrible" but scores "stale", "cold", "slow",
"overpriced" and "would not come back" as 0. The corpus contains such words on
purpose, so a policy can please the judge without being what a reader would call
positive, as with any learned reward model.

What is scored: the response only, not prompt + response. The prompt is given, not
chosen by the policy, and the task's prompts are sentiment-neutral; adding them
would only shift every score of a prompt by a prompt-dependent amount *inside*
VADER's non-linear squashing, so the pairwise difference r(x, y1) - r(x, y2) that
Bradley-Terry labels use would depend on the prompt for no reason. Scoring y alone
makes r a function of what the policy wrote. Special tokens are not part of the
text (decode with ``skip_special_tokens=True``).

The judge has the callable-reward-model interface of ``sail_min``:
``judge(prompts: list[str], responses: list[str]) -> list[float]``.

Files (built by ``python data/make_sentiment_task.py``, seeded, a few MB):

    data/sentiment/base/               LlamaForCausalLM + PreTrainedTokenizerFast
    data/sentiment/train_prompts.jsonl {"prompt": ...}    (TRL prompt-only)
    data/sentiment/eval_prompts.jsonl  {"prompt": ...}    (disjoint from train)
    data/sentiment/preferences.jsonl   {"prompt", "chosen", "rejected"}  (TRL)
    data/sentiment/card.json           recipe and measured statistics

Tokenizer notes: the tokenizer prepends ``<bos>`` to every encoding (encode
responses with ``add_special_tokens=False``); ``<pad>`` differs from ``<eos>``; it
is saved with right padding, set ``padding_side="left"`` for generation.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence


#: Default location of the task files: <repo>/data/sentiment.
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "data" / "sentiment"

#: Bradley-Terry temperature used to label the shipped preference file, on the scale
#: of VADER compound scores: P(y1 > y2) = sigmoid((r1 - r2) / 0.1). A gap of 0.1
#: gives 73 %, 0.3 gives 95 %, a tie 50 %. Typical gaps between a positive and a
#: negative review are ~1, so labels are nearly deterministic there and noisy only
#: between similar responses, like human labels.
BT_TEMPERATURE = 0.1


class VaderJudge:
    """Ground-truth reward: VADER compound sentiment of each response, in (-1, 1).

    ``judge(prompts, responses)[i] = compound(responses[i])``; ``prompts`` is checked
    for length and otherwise ignored (see the module docstring for why). The scores
    are deterministic and identical across calls and instances.
    """

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer   # only when a judge is built

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Score a batch: returns one float per (prompt, response) pair."""
        _check_sequence("prompts", prompts)  # str or chat messages: not read
        _check_sequence("responses", responses)
        for i, y in enumerate(responses):
            if not isinstance(y, str):
                raise TypeError(f"responses[{i}] must be str, got {type(y).__name__}")
        if len(prompts) != len(responses):
            raise ValueError(
                f"prompts and responses must have the same length, got "
                f"len(prompts)={len(prompts)} and len(responses)={len(responses)}"
            )
        return [float(self._analyzer.polarity_scores(y)["compound"]) for y in responses]

    def __repr__(self) -> str:
        return "VaderJudge(score=compound(response), range=(-1, 1))"


def _check_sequence(name: str, xs) -> None:
    """Raise a clear error unless ``xs`` is a sequence (list, tuple, ...) but not a str."""
    if isinstance(xs, str) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list (one entry per pair), got {type(xs).__name__}")


def bradley_terry_choose_first(r1: float, r2: float, tau: float, rng: random.Random) -> bool:
    """Sample a Bradley-Terry label: True means y1 is preferred (y1 = chosen).

        P(y1 > y2) = sigmoid((r1 - r2) / tau) = 1 / (1 + exp(-(r1 - r2) / tau))

    ``tau -> 0`` gives the argmax label (ties broken at random), large ``tau`` gives
    coin flips. One ``rng.random()`` draw per call, so a seeded ``rng`` gives
    reproducible labels.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got tau={tau}")
    d = (r1 - r2) / tau
    p_first = 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))
    return rng.random() < p_first


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file into a list of dicts (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"path={str(path)!r} does not exist; build the task with "
            f"`python data/make_sentiment_task.py`"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def label_agreement(rows: Sequence[dict], judge: VaderJudge) -> tuple[float, int]:
    """Fraction of pairs whose label agrees with the judge, ties excluded.

    Returns ``(mean[r(chosen) > r(rejected)] over pairs with r(chosen) != r(rejected),
    number of such pairs)``. Under Bradley-Terry labels at temperature tau its
    expectation is ``mean sigmoid(|r1 - r2| / tau)``.
    """
    prompts = [r["prompt"] for r in rows]
    rc = judge(prompts, [r["chosen"] for r in rows])
    rr = judge(prompts, [r["rejected"] for r in rows])
    decided = [(a, b) for a, b in zip(rc, rr) if a != b]
    if not decided:
        return float("nan"), 0
    return sum(a > b for a, b in decided) / len(decided), len(decided)


@dataclass(frozen=True)
class SentimentTask:
    """Everything the training loop needs for the sentiment toy task.

    Paths point into ``root``; ``train_prompts``/``eval_prompts`` are the prompt
    strings (disjoint); ``judge`` is the ground-truth reward callable.
    """

    root: Path
    base_model_path: Path
    train_prompts_path: Path
    eval_prompts_path: Path
    preferences_path: Path
    train_prompts: list[str] = field(repr=False)
    eval_prompts: list[str] = field(repr=False)
    judge: VaderJudge = field(repr=False)
    bt_temperature: float = BT_TEMPERATURE

    def __repr__(self) -> str:
        return (f"SentimentTask(root={str(self.root)!r}, train_prompts={len(self.train_prompts)}, "
                f"eval_prompts={len(self.eval_prompts)}, judge={self.judge!r}, "
                f"bt_temperature={self.bt_temperature})")

    def preferences(self) -> list[dict]:
        """The offline preference pairs: dicts with "prompt", "chosen", "rejected"."""
        return read_jsonl(self.preferences_path)


def load_sentiment_task(root: str | Path | None = None) -> SentimentTask:
    """Locate and check the task files under ``root`` (default: data/sentiment).

    Reads the prompt files (cheap) but not the model; use `load_base_model`.
    """
    root = Path(root) if root is not None else DEFAULT_ROOT
    if not root.is_dir():
        raise FileNotFoundError(
            f"root={str(root)!r} is not a directory; build the task with "
            f"`python data/make_sentiment_task.py`"
        )
    base = root / "base"
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"no base model in {str(base)!r} (root={str(root)!r})")
    train = [r["prompt"] for r in read_jsonl(root / "train_prompts.jsonl")]
    evals = [r["prompt"] for r in read_jsonl(root / "eval_prompts.jsonl")]
    overlap = set(train) & set(evals)
    if overlap:
        raise ValueError(f"train and eval prompts under root={str(root)!r} overlap: "
                         f"{sorted(overlap)[:3]}")
    return SentimentTask(
        root=root,
        base_model_path=base,
        train_prompts_path=root / "train_prompts.jsonl",
        eval_prompts_path=root / "eval_prompts.jsonl",
        preferences_path=root / "preferences.jsonl",
        train_prompts=train,
        eval_prompts=evals,
        judge=VaderJudge(),
    )


def load_base_model(path: str | Path | None = None):
    """Load the tiny base policy and its tokenizer from disk, never from a hub.

    Returns ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode (fp32) and a
    ``PreTrainedTokenizerFast``. The model's ``generation_config`` is the sampling
    distribution the shipped pairs were drawn from (do_sample, temperature 1,
    top_k 0, top_p 1, max_new_tokens 24).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: import lazily
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # no "Loading weights" bar on stderr: notebooks compare it

    path = Path(path) if path is not None else DEFAULT_ROOT / "base"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"path={str(path)!r} holds no model; build it with "
            f"`python data/make_sentiment_task.py`"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------
# the task as the training loop sees it (the experiments on it: sail_min/lab/experiments.py)
# --------------------------------------------------------------------------------------
REWARD_LABEL = "judge reward (VADER compound, -1..1)"
def sentiment_task(root: str | Path | None = None):
    """The toy task as a ``sail_min.train.Task``, its files read through ``sail_min.data`` (validated)."""
    from ..data import load_preference_data, load_prompt_data
    from ..train import Task

    files = load_sentiment_task(root)
    preferences = [dict(row) for row in load_preference_data(files.preferences_path)]
    train_prompts = [row["prompt"] for row in load_prompt_data(files.train_prompts_path)]
    eval_prompts = [row["prompt"] for row in load_prompt_data(files.eval_prompts_path)]
    return Task(preferences, train_prompts, eval_prompts, files.judge, files.bt_temperature)


DATASET_JUDGE_QUERIES_PER_PAIR = 2
"""What building the offline dataset cost: the judge scored both responses of every pair (then a Bradley-Terry
draw labelled it), the same 2 queries per pair that the loop's ``judge_queries`` counts for a pair it labels."""


def reads_dataset(config) -> bool:
    """Does a run of ``config`` train on dataset pairs (routes dpo or dp)?"""
    return config.route_dpo + config.route_dp > 0


def judge_budget(config, judge_queries: int, dataset_pairs: int) -> int:
    """The judge queries a run cost on this task: the loop's ``judge_queries`` (2 per pair it labelled with the
    judge) plus ``DATASET_JUDGE_QUERIES_PER_PAIR`` per dataset pair it can read (``dataset_pairs``, after
    ``task_for_method`` trimmed the dataset), when it reads the dataset at all."""
    return judge_queries + (DATASET_JUDGE_QUERIES_PER_PAIR * dataset_pairs if reads_dataset(config) else 0)


def task_for_method(task, config):
    """This task's rules for one run:

    - equal judge budget (``judge_budget``): building the offline dataset cost 2 judge queries per pair (672
      pairs = 42 steps x 16 pairs, as many queries as online DPO spends labelling its own samples). A method
      that mixes dataset pairs with judge-labelled online pairs (SAIL-PR) gets only the first
      ``dataset pairs - E[online judge pairs]`` dataset pairs, so every method spends the same EXPECTED budget
      (the number of online pairs a run draws is random: its realised budget varies by a few dozen queries);
    - the public code labels pairs by the reward model's argmax: its row gets argmax judge labels (the
      others draw Bradley-Terry labels at the temperature the dataset was labelled with)."""
    import dataclasses
    if config.response_mode == "public":
        task = dataclasses.replace(task, judge_temperature=None)
    if config.route_pr == 0 or not reads_dataset(config):
        return task
    online_pairs = round(config.route_pr * config.steps * config.pairs_per_step / config.reuse_steps)
    return dataclasses.replace(task, preferences=task.preferences[:max(1, len(task.preferences) - online_pairs)])
