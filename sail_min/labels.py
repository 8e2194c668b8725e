"""Preference labels for pairs of responses: which of y1, y2 (to the same prompt x) is chosen.

Every source scores both responses, s1 = s(x, y1) and s2 = s(x, y2), and a rule turns the two
scores into a label `first_is_chosen` (True: y_w = y1, y_l = y2; False: the other way round):

    argmax      y1 chosen  iff  s1 >= s2                          (tie rule: ties go to y1, as in TRL)
    bernoulli   y1 chosen  with probability  sigma(s1 - s2)       (a sample of the Bradley-Terry model)

The three sources:

    (a) dataset          pairs are stored as (chosen, rejected), so y1 wins; there are no scores.
    (b) reward model     s = r_phi(x, y): a Hugging Face sequence classifier read with ITS OWN
                         tokenizer (`RewardModelScorer`), or any callable (prompts, responses) -> scores.
    (c) implicit reward  s = beta * (l_theta(y|x) - l_ref(y|x)), the policy's own reward as in DPO,
                         with l(y|x) = sum_t log pi(y_t | x, y_<t) from `sail_min.logprobs`.

Labels are data, not part of the computation graph: every score is detached.

The judge contract. A judge (reward model, scorer) is any callable
`judge(prompts, responses) -> scores` with one finite real number per response:
a list/tuple of numbers or a 1-D tensor/array of length N = len(responses).
`check_judge_scores` enforces it and names the judge, the count and the first bad index;
anything else (N +- 1 scores, one score or a column [N, 1], strings, None, bools, NaN,
+-inf) raises ValueError instead of silently mislabelling pairs (NaN >= s is False, so a
NaN score would make every second response 'chosen').

Reading a reward model. The policy's token ids mean nothing to a reward model with another
vocabulary, so responses travel as decoded text and are re-tokenised here (with the reward
model's chat template when it has one), padded on the RIGHT. A decoder reward model is read at
the last token that the attention mask marks as real. Looking for the last token that is not
`pad_token_id` (what `*ForSequenceClassification.forward` does) reads the wrong token when
pad == eos and the text ends with eos: the eos itself looks like padding.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Prompt = str | list[dict]
Judge = Callable[[Sequence[Prompt], Sequence[str]], "torch.Tensor | Sequence[float]"]


@dataclass
class PairLabels:
    """The label of each pair and, when the source has them, the scores behind it."""

    first_is_chosen: torch.Tensor                # bool [N]: True -> (y_w, y_l) = (y1, y2)
    first_scores: torch.Tensor | None = None     # float [N]: s(x, y1); None for dataset labels
    second_scores: torch.Tensor | None = None    # float [N]: s(x, y2)

    def chosen_rejected(self, first, second):
        """Reorder a pair of batches into (chosen, rejected): y_w = y1 if first_is_chosen else y2.

        `first` and `second` are tensors with the pair index as leading dimension, or lists.
        """
        if isinstance(first, torch.Tensor):
            pick_first = self.first_is_chosen.to(first.device).view(-1, *([1] * (first.dim() - 1)))
            return torch.where(pick_first, first, second), torch.where(pick_first, second, first)
        flags = self.first_is_chosen.tolist()
        chosen = [a if f else b for a, b, f in zip(first, second, flags)]
        rejected = [b if f else a for a, b, f in zip(first, second, flags)]
        return chosen, rejected


def choose(first_scores, second_scores, rule: str = "argmax",
           generator: torch.Generator | None = None) -> PairLabels:
    """Turn scores into labels with `rule` = "argmax" (ties -> first) or "bernoulli"."""
    s1 = torch.as_tensor(first_scores, dtype=torch.float32).detach().cpu()
    s2 = torch.as_tensor(second_scores, dtype=torch.float32).detach().cpu()
    if s1.shape != s2.shape or s1.dim() != 1:
        raise ValueError(f"first_scores and second_scores must be 1-D of equal length, "
                         f"got shapes {tuple(s1.shape)} and {tuple(s2.shape)}")
    if rule == "argmax":
        first_is_chosen = s1 >= s2                                               # y1 iff s1 >= s2
    elif rule == "bernoulli":
        prob_first = torch.sigmoid(s1 - s2)                                      # P(y1 > y2) = sigma(s1 - s2)
        first_is_chosen = torch.rand(s1.shape, generator=generator) < prob_first
    else:
        raise ValueError(f"rule must be 'argmax' or 'bernoulli', got {rule!r}")
    return PairLabels(first_is_chosen, s1, s2)


# The judge contract ------------------------------------------------------------------------

def judge_name(judge) -> str:
    """A readable name for a judge: its __name__, else its type's name (a RewardModelScorer)."""
    if isinstance(judge, str):
        return judge
    return getattr(judge, "__name__", type(judge).__name__)


def check_judge_scores(scores, expected: int, judge: Callable | str) -> torch.Tensor:
    """Check what a judge returned for `expected` responses; return float32 [expected] on the CPU.

    Accepted: a list or tuple of real numbers (int, float, numpy scalars, 0-d tensors), or a
    1-D tensor / numpy array of a real dtype, with exactly one score per response, every one
    finite, also as float32. Bools are refused: with a pass/fail judge every pair of two passes
    is a tie; return float(...) if that is meant.
    Raises ValueError naming the judge (`judge`: the callable or its name), the number of
    scores expected and received, and the first bad index.
    """
    said = f"judge {judge_name(judge)!r} returned"
    if isinstance(scores, torch.Tensor) or (hasattr(scores, "__array__") and not isinstance(scores, (list, tuple))):
        try:
            values = torch.as_tensor(scores).detach()
        except (TypeError, ValueError, RuntimeError):                # numpy arrays of objects or strings
            raise ValueError(f"{said} an array of dtype {getattr(scores, 'dtype', '?')}, expected "
                             f"{expected} numbers, one per response") from None
        if values.dim() != 1:
            what = "a single score (0-d)" if values.dim() == 0 else f"scores of shape {tuple(values.shape)}"
            raise ValueError(f"{said} {what}, expected {expected} scores (shape ({expected},)), one per response")
        if len(values) != expected:
            raise ValueError(f"{said} {len(values)} scores for {expected} responses, expected one per response")
        if values.dtype == torch.bool or values.is_complex():
            raise ValueError(f"{said} {expected} scores of dtype {values.dtype} (first bad index 0), "
                             f"expected real numbers")
        values = values.cpu().double()
    else:
        if isinstance(scores, numbers.Number) and not isinstance(scores, bool):
            raise ValueError(f"{said} a single score {scores!r:.30}, expected {expected} scores, one per response")
        if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
            raise ValueError(f"{said} {type(scores).__name__} {scores!r:.60}, expected a list, tuple or "
                             f"1-D tensor of {expected} scores, one per response")
        if len(scores) != expected:
            raise ValueError(f"{said} {len(scores)} scores for {expected} responses, expected one per response")
        floats = []
        for i, score in enumerate(scores):
            if isinstance(score, torch.Tensor) and score.dim() == 0 and score.dtype != torch.bool:
                score = score.item()
            if isinstance(score, bool) or not isinstance(score, numbers.Real):
                raise ValueError(f"{said} {expected} scores for {expected} responses; score {i} is "
                                 f"{score!r:.60} ({type(score).__name__}), not a real number")
            floats.append(float(score))
        values = torch.tensor(floats, dtype=torch.float64)
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{said} {expected} scores for {expected} responses; score {bad[0]} is "
                         f"{values[bad[0]].item()} ({len(bad)} of {expected} not finite)")
    too_large = (~torch.isfinite(values.float())).nonzero().flatten().tolist()
    if too_large:
        raise ValueError(f"{said} {expected} scores for {expected} responses; score {too_large[0]} is "
                         f"{values[too_large[0]].item():.3g}, too large for float32")
    return values.float()


class JudgeError(RuntimeError):
    """A judge call failed: it raised, broke the contract or did not answer in time. The message is one
    line naming the judge, the call (``where``: e.g. "at step 12") and the problem."""


class CheckedJudge:
    """The user's judge, held to the contract at EVERY call: what it returns passes ``check_judge_scores``,
    and whatever goes wrong (an exception, a broken contract, no answer within ``timeout_s`` seconds) is a
    ``JudgeError`` naming the judge, ``where`` (set by the caller, e.g. "at step 12") and the problem.
    ``timeout_s`` 0 = wait as long as it takes; otherwise the call runs in a daemon thread that is
    abandoned (not stopped: Python cannot stop a thread) when the time is up. Attributes of the judge
    (e.g. a reward model's ``truncated``) pass through."""

    def __init__(self, judge: Callable, timeout_s: float = 0.0, where: str = ""):
        self.judge, self.timeout_s, self.where = judge, timeout_s, where
        self.__name__ = judge_name(judge)

    def __call__(self, prompts, responses) -> torch.Tensor:
        said = f"judge {self.__name__!r}{' ' + self.where if self.where else ''}"
        try:
            scores = self._call(prompts, responses)
        except TimeoutError:
            raise JudgeError(f"{said}: no answer within judge_timeout_s={self.timeout_s:g} s (a hung "
                             f"reward server?)") from None
        except Exception as error:
            raise JudgeError(f"{said}: raised {' '.join(repr(error).split())}") from error
        try:
            return check_judge_scores(scores, len(responses), self.judge)
        except ValueError as error:                          # "judge 'name' returned ...": the problem
            problem = str(error).split(" returned ", 1)[-1]
            raise JudgeError(f"{said}: returned {problem}") from None

    def _call(self, prompts, responses):
        if not self.timeout_s:
            return self.judge(prompts, responses)
        import threading
        result = {}

        def call():
            try:
                result["scores"] = self.judge(prompts, responses)
            except BaseException as error:                   # re-raised in the caller's thread
                result["error"] = error

        thread = threading.Thread(target=call, name=f"judge {self.__name__}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            raise TimeoutError
        if "error" in result:
            raise result["error"]
        return result["scores"]

    def __getattr__(self, name):
        return getattr(self.__dict__["judge"], name)


# (a) dataset ------------------------------------------------------------------------------

def dataset_labels(num_pairs: int) -> PairLabels:
    """Dataset pairs are (chosen, rejected): the first response is always the chosen one."""
    return PairLabels(torch.ones(num_pairs, dtype=torch.bool))


# (b) reward model -------------------------------------------------------------------------

def reward_model_labels(judge: Judge, prompts: Sequence[Prompt], first_responses: Sequence[str],
                        second_responses: Sequence[str], rule: str = "argmax",
                        generator: torch.Generator | None = None) -> PairLabels:
    """Label pairs by s = r_phi(x, y), with `judge(prompts, responses) -> scores`.

    `judge` is a `RewardModelScorer` or any callable, e.g. a lexicon-based judge; what it
    returns is held to the judge contract (`check_judge_scores`). It is called once for the pair set,
    on 2N responses (every y1, then every y2; each prompt twice): one batch for a reward model, one
    request for a remote judge.
    """
    if not len(prompts) == len(first_responses) == len(second_responses):
        raise ValueError(f"prompts, first_responses and second_responses differ in length: "
                         f"{len(prompts)}, {len(first_responses)}, {len(second_responses)}")
    n = len(prompts)                        # one call for the pair set: [y1 of every pair; y2 of every pair]
    scores = check_judge_scores(judge(list(prompts) * 2, list(first_responses) + list(second_responses)), 2 * n, judge)
    return choose(scores[:n], scores[n:], rule, generator)


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r_phi(x, y) for a tokenised batch, one score per row, gradients kept (for training an RM).

    Decoder reward models (those with a `score` head: Llama, Qwen2, Mistral, GPT-2, ...) put the
    head on the hidden state of the last real token, found from the attention mask:
        last_b = max{t : attention_mask[b, t] = 1},   r_b = score(h_b[last_b]).
    Encoder reward models (BERT-like) pool their first token themselves; right padding suits them.
    """
    if model.config.num_labels != 1:
        raise ValueError(f"reward model must output one score (num_labels=1), "
                         f"got num_labels={model.config.num_labels}")
    if not hasattr(model, "score"):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last_real = (attention_mask * positions).argmax(dim=1)                 # max{t : mask[b, t] = 1}
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)         # 0, 1, ... over real tokens
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=False).last_hidden_state
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_real]
    return model.score(last_hidden)[:, 0]                                  # r_b = score(h_b[last_b])


class RewardModelScorer:
    """Callable (prompts, responses) -> scores [N] for a sequence-classification reward model.

    Responses are text (decode the policy's ids first), re-tokenised with the reward model's own
    tokenizer, right-padded, in batches of at most `batch_size` texts of similar length
    (`length_batches`: a few answers of thousands of tokens, as in UltraFeedback, do not pad a whole
    batch to their length); scores come back in the order given. The model is put in eval mode. A text
    longer than `max_length` tokens (default: the reward model's positions) loses tokens from its
    START, so the response, the part being judged, stays whole; `truncated` counts such texts.
    """

    def __init__(self, model, tokenizer, batch_size: int = 32, max_length: int | None = None):
        if tokenizer.pad_token_id is None:
            raise ValueError("reward tokenizer has no pad token: set tokenizer.pad_token "
                             "(e.g. to tokenizer.eos_token) before scoring batches")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.truncated = 0
        self.__name__ = f"RewardModelScorer({getattr(model.config, '_name_or_path', '') or type(model).__name__})"

    def render(self, prompt: Prompt, response: str | list[dict]) -> str:
        """The text the reward model reads: its chat template over (user: x, assistant: y).

        Prompts and responses are text or message lists (conversational data)."""
        return self.render_all([prompt], [response])[0]

    def render_all(self, prompts: Sequence[Prompt], responses: Sequence[str | list[dict]]) -> list[str]:
        """``render`` of every (prompt, response), the chat template applied in one call."""
        if self.tokenizer.chat_template is not None:
            conversations = [([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
                             + ([{"role": "assistant", "content": response}] if isinstance(response, str)
                                else list(response)) for prompt, response in zip(prompts, responses)]
            return self.tokenizer.apply_chat_template(conversations, tokenize=False) if conversations else []
        if not all(isinstance(prompt, str) and isinstance(response, str) for prompt, response in zip(prompts, responses)):
            raise ValueError("reward tokenizer has no chat template, so prompts and responses must be "
                             "plain strings, got a message list")
        return [prompt + response for prompt, response in zip(prompts, responses)]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses differ in length: {len(prompts)} vs {len(responses)}")
        texts = self.render_all(prompts, responses)
        if not texts:
            return torch.empty(0)
        # A chat template writes its own special tokens (BOS, ...); plain text gets the defaults.
        add_special_tokens = self.tokenizer.chat_template is None
        device = next(self.model.parameters()).device
        ids = self.tokenizer(texts, add_special_tokens=add_special_tokens).input_ids      # tokenised once
        too_long = [i for i, row in enumerate(ids) if self.max_length is not None and len(row) > self.max_length]
        if too_long:                              # cut from the START: the response, the part judged, stays whole
            self.truncated += len(too_long)
            side, self.tokenizer.truncation_side = self.tokenizer.truncation_side, "left"
            try:                    # the attribute, not a call argument: transformers 5 ignores truncation_side=
                cut = self.tokenizer([texts[i] for i in too_long], truncation=True, max_length=self.max_length,
                                     add_special_tokens=add_special_tokens).input_ids
            finally:
                self.tokenizer.truncation_side = side
            for i, row in zip(too_long, cut):
                ids[i] = row
        scores = torch.empty(len(texts))
        for rows in length_batches([len(row) for row in ids], self.batch_size):
            input_ids, attention_mask = right_padded([ids[i] for i in rows], self.tokenizer.pad_token_id)
            with torch.inference_mode():                       # no autograd bookkeeping; scores is a normal tensor
                scores[rows] = reward_scores(self.model, input_ids.to(device), attention_mask.to(device)).float().cpu()
        return scores


def right_padded(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, longest row] of token-id lists, padded on the RIGHT."""
    lengths = torch.tensor([len(row) for row in rows])
    input_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(row, dtype=torch.long) for row in rows],
                                                batch_first=True, padding_value=pad_token_id)
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths.unsqueeze(1)).long()
    return input_ids, attention_mask


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of texts of these token lengths, in batches to score: shortest first, at most `batch_size`
    texts per batch, and a batch ends before a text more than twice as long as its first. At least half
    of every padded batch is real tokens, and no batch is larger than `batch_size` rows of the longest
    text (the most that batches in the given order could cost). Equal lengths keep their order."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batches and len(batches[-1]) < batch_size and lengths[i] <= 2 * max(lengths[batches[-1][0]], 1):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


# (c) implicit reward ----------------------------------------------------------------------

def implicit_reward_labels(policy_logps_first: torch.Tensor, policy_logps_second: torch.Tensor,
                           ref_logps_first: torch.Tensor, ref_logps_second: torch.Tensor,
                           beta: float, rule: str = "bernoulli",
                           generator: torch.Generator | None = None) -> PairLabels:
    """Label pairs by the policy's implicit reward  s = beta * (l_theta(y|x) - l_ref(y|x)).

    With rule="bernoulli", P(y1 chosen) = sigma(s1 - s2) = sigma(z), the policy's own
    Bradley-Terry model (SAIL-PP); with rule="argmax" the more rewarded response wins.
    """
    first_scores = beta * (policy_logps_first.detach() - ref_logps_first.detach())     # s1
    second_scores = beta * (policy_logps_second.detach() - ref_logps_second.detach())  # s2
    return choose(first_scores, second_scores, rule, generator)
