r"""The SAIL training loop: route -> sample -> label -> loss -> step, on any device.

One optimiser step (``train``, the loop body):

  1. route    each of the ``pairs_per_step`` pairs to dpo / dp / pp / pr (``objective.ROUTES``)
              with the config's routing probabilities;
  2. sample   dataset pairs for dpo/dp; for pp/pr, k fresh samples of the CURRENT policy per
              prompt (nothing is buffered or reused: every online pair is on-policy);
  3. score    l_theta and l_ref of both responses of every pair (``sail_min.logprobs``);
  4. label    dpo: the dataset; dp/pp: the policy's implicit reward, P(y1 > y2) = sig(z);
              pr: the judge / reward model (Bradley-Terry at the task's temperature);
  5. loss     ``objective.sail_loss`` with per-pair coefficients from the route;
  6. step     gradients averaged over processes, clipped, applied; a non-finite loss or
              gradient skips the step (weights untouched), warns and is counted.

Every random choice of step t is seeded by (seed, t, process), so a run resumed from a
checkpoint draws exactly what the uninterrupted run would have drawn. Metrics go to
``output_dir/metrics.jsonl``, one line per step; evaluation lines carry ``eval/*`` keys.

Multi-process (``accelerate launch``): each process draws its own pairs; gradients are
averaged explicitly with ``accelerator.reduce`` (no DDP wrapper, because the log-prob code
calls the model's decoder directly); process 0 evaluates, logs and checkpoints.
"""
from __future__ import annotations

import json
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .config import SAILConfig
from .labels import implicit_reward_labels, reward_model_labels
from .logprobs import ReferenceModel, sequence_logprobs
from .objective import LABELS_FROM, RESPONSES_FROM, ROUTES, sail_loss
from .sampling import Responses, encode_responses, render_prompts, sample_responses


@dataclass
class Task:
    """What a run learns from, besides the model and the config."""

    preferences: Sequence[dict]
    """offline pairs {"prompt", "chosen", "rejected"} for dpo/dp routes (validated by ``sail_min.data``)"""
    train_prompts: Sequence
    """prompts for online (pp/pr) pairs"""
    eval_prompts: Sequence
    """held-out prompts for the judge reward, win rate and KL"""
    judge: Callable
    """(prompts, responses) -> scores: labels pr pairs, scores evaluation samples"""
    judge_temperature: float | None = None
    """Bradley-Terry temperature of judge labels, P(y1 > y2) = sig((s1 - s2) / T); None = argmax"""


# --------------------------------------------------------------------------------------
# small pieces of the loop
# --------------------------------------------------------------------------------------
def step_seed(seed: int, step: int, process: int, purpose: str) -> int:
    """A 63-bit seed that depends only on (seed, step, process, purpose)."""
    return random.Random(f"{seed}/{step}/{process}/{purpose}").getrandbits(63)


def truncate_prompts_left(tokenizer, prompts: Sequence, max_tokens: int) -> tuple[list, int]:
    """Cut over-long prompts from the left; return (prompts, how many were cut).

    Without a chat template, plain text keeps its last ``max_tokens`` tokens. Otherwise a prompt
    (a string becomes one user message) is measured as the policy reads it, template included: its oldest non-system messages are dropped
    while more than one remains, then the first remaining non-system message loses tokens from
    its start until the whole fits (the template's own tokens are never cut).
    """
    out, cut = [], 0
    for prompt in prompts:
        if isinstance(prompt, str) and tokenizer.chat_template is None:
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            if len(ids) > max_tokens:
                prompt, cut = tokenizer.decode(ids[-max_tokens:]), cut + 1
        elif isinstance(prompt, str):               # the sampler will wrap it as one user message
            user = [{"role": "user", "content": prompt}]
            if _prompt_length(tokenizer, user) > max_tokens:
                prompt, cut = _truncate_conversation(tokenizer, user, max_tokens)[0]["content"], cut + 1
        elif _prompt_length(tokenizer, prompt) > max_tokens:
            prompt, cut = _truncate_conversation(tokenizer, prompt, max_tokens), cut + 1
        out.append(prompt)
    return out, cut


def _prompt_length(tokenizer, messages: list[dict]) -> int:
    text = render_prompts(tokenizer, [messages])[0]
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _truncate_conversation(tokenizer, messages: list[dict], max_tokens: int) -> list[dict]:
    messages = [dict(m) for m in messages]
    body = [i for i, m in enumerate(messages) if m["role"] != "system"]
    while len(body) > 1 and _prompt_length(tokenizer, messages) > max_tokens:   # drop the oldest turns,
        del messages[body[0]]                                                      # never starting with
        body = [i for i, m in enumerate(messages) if m["role"] != "system"]        # an assistant turn
        while len(body) > 1 and messages[body[0]]["role"] == "assistant":
            del messages[body[0]]
            body = [i for i, m in enumerate(messages) if m["role"] != "system"]
    first = body[0]
    for _ in range(8):                         # re-tokenising can merge tokens: a few rounds at most
        overflow = _prompt_length(tokenizer, messages) - max_tokens
        if overflow <= 0:
            return messages
        ids = tokenizer(messages[first]["content"], add_special_tokens=False).input_ids
        if overflow >= len(ids):
            raise ValueError(f"max_prompt_tokens={max_tokens} is shorter than the chat template's own "
                             f"tokens for this prompt; raise max_prompt_tokens")
        messages[first]["content"] = tokenizer.decode(ids[overflow:])
    return messages


def autocast(config: SAILConfig, accelerator: Accelerator):
    """torch.autocast for ``config.mixed_precision`` ("no" = a disabled context: plain fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    return torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype is not None)


def _cache(config: SAILConfig) -> str | None:
    """The sampler's KV cache: None (dynamic) or "static"."""
    return None if config.generation_cache == "dynamic" else "static"


def _logps(policy, reference: ReferenceModel, responses) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_theta, l_ref) of every row, l_theta with gradient."""
    inputs = {k: v.to(next(policy.parameters()).device) for k, v in responses.model_inputs().items()}
    return sequence_logprobs(policy, **inputs), reference.logprobs(**inputs)


def _judge_labels(task: Task, prompts, first_texts, second_texts, generator):
    temperature = task.judge_temperature
    score = task.judge if temperature is None else (
        lambda p, r: torch.as_tensor(task.judge(p, r), dtype=torch.float32) / temperature)
    return reward_model_labels(score, prompts, first_texts, second_texts,
                               rule="argmax" if temperature is None else "bernoulli", generator=generator)


@torch.no_grad()
def evaluate(policy, reference: ReferenceModel, tokenizer, task: Task, config: SAILConfig,
             reference_scores: torch.Tensor, accelerator: Accelerator) -> dict:
    """Judge reward, win rate vs the reference's samples and KL(pi || pi_ref) on held-out prompts.

    KL is the Monte-Carlo estimate E_{y ~ pi}[l_theta(y|x) - l_ref(y|x)] on one sample per prompt;
    win rate counts ties as 1/2. Sampling uses a fixed seed, so steps are comparable.
    """
    prompts = list(task.eval_prompts[: config.eval_prompts])
    with autocast(config, accelerator):
        samples = sample_responses(policy, tokenizer, prompts, k=1, max_new_tokens=config.max_new_tokens,
                                   temperature=config.temperature, seed=step_seed(config.seed, -1, 0, "eval"),
                                   cache_implementation=_cache(config))
    scores = torch.as_tensor(task.judge(prompts, samples.texts), dtype=torch.float32)
    was_training = policy.training
    policy.eval()
    with autocast(config, accelerator):
        policy_logps, ref_logps = _logps(policy, reference, samples)
    policy.train(was_training)
    wins = (scores > reference_scores).float() + 0.5 * (scores == reference_scores).float()
    return {"eval/judge_reward": scores.mean().item(), "eval/judge_reward_std": scores.std().item(),
            "eval/reference_judge_reward": reference_scores.mean().item(),
            "eval/win_rate": wins.mean().item(), "eval/kl": (policy_logps - ref_logps).mean().item(),
            "eval/response_length": samples.lengths.float().mean().item(),
            "eval/contains_eos": samples.contains_eos.float().mean().item()}


RESUMABLE_CHANGES = ("steps", "output_dir", "eval_every", "checkpoint_every")
"""Settings a resumed run may change: how long it runs and how often it evaluates and saves."""


def _save_checkpoint(path: Path, config: SAILConfig, policy, optimizer, next_step: int, counters: dict,
                     scaler=None) -> None:
    """The trainable weights (frozen ones never change), optimizer, step and counters.
    Atomic: a run killed while saving keeps its previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    trainable = {name: p.detach() for name, p in policy.named_parameters() if p.requires_grad}  # LoRA: adapters only
    torch.save({"model": trainable, "optimizer": optimizer.state_dict(), "next_step": next_step,
                "config": asdict(config),
                "counters": counters, "scaler": scaler.state_dict() if scaler else None}, tmp)
    os.replace(tmp, path)


def _make_optimizer(config: SAILConfig, params):
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


# --------------------------------------------------------------------------------------
# the steps of one iteration
# --------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """One step's pairs: dataset pairs first (y1 = chosen, y2 = rejected), then online pairs
    (y1, y2 = the first two samples of a prompt). ``routes`` indexes ``objective.ROUTES``."""

    routes: torch.Tensor
    dataset: Responses | None        # 2n rows: the n chosen, then the n rejected responses
    online: Responses | None         # k rows per online prompt
    online_prompts: list
    truncated_prompts: int


def draw_pairs(policy, tokenizer, task: Task, config: SAILConfig, accelerator, seed) -> Pairs:
    """Route every pair, then take its responses: from the dataset, or fresh samples of pi_theta."""
    rng = random.Random(seed("data"))
    routes = rng.choices(range(len(ROUTES)), weights=config.route_probs, k=config.pairs_per_step)
    dataset_routes = [r for r in routes if RESPONSES_FROM[ROUTES[r]] == "dataset"]
    online_routes = [r for r in routes if RESPONSES_FROM[ROUTES[r]] == "policy"]
    rows = [task.preferences[rng.randrange(len(task.preferences))] for _ in dataset_routes]
    online_prompts = [task.train_prompts[rng.randrange(len(task.train_prompts))] for _ in online_routes]
    dataset_prompts, cut_dataset = truncate_prompts_left(tokenizer, [r["prompt"] for r in rows], config.max_prompt_tokens)
    online_prompts, cut_online = truncate_prompts_left(tokenizer, online_prompts, config.max_prompt_tokens)
    dataset = online = None
    if rows:
        dataset = encode_responses(tokenizer, dataset_prompts + dataset_prompts,
                                   [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    if online_routes:
        with autocast(config, accelerator):
            online = sample_responses(policy, tokenizer, online_prompts, k=config.samples_per_prompt,
                                      max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                      seed=seed("sample"), cache_implementation=_cache(config))
    return Pairs(torch.tensor(dataset_routes + online_routes), dataset, online, online_prompts,
                 cut_dataset + cut_online)


def score_pairs(policy, reference: ReferenceModel, pairs: Pairs, config: SAILConfig, accelerator):
    """(l_theta(y1), l_theta(y2), l_ref(y1), l_ref(y2)), one value per pair; l_theta with gradient."""
    first, second = [], []
    with autocast(config, accelerator):
        if pairs.dataset is not None:
            n = len(pairs.dataset) // 2
            pol, ref = _logps(policy, reference, pairs.dataset)
            first.append((pol[:n], ref[:n]))
            second.append((pol[n:], ref[n:]))
        if pairs.online is not None:
            k = config.samples_per_prompt
            pol, ref = _logps(policy, reference, pairs.online)
            first.append((pol[0::k], ref[0::k]))
            second.append((pol[1::k], ref[1::k]))
    (pol1, ref1), (pol2, ref2) = [(torch.cat(p), torch.cat(r)) for p, r in (zip(*first), zip(*second))]
    return pol1, pol2, ref1, ref2


def label_pairs(pairs: Pairs, logps, task: Task, config: SAILConfig, generator) -> tuple[torch.Tensor, int]:
    """Is y1 the chosen response? dpo: yes (the dataset's order); dp/pp: a draw of the policy's
    Bradley-Terry model sig(z); pr: the judge. Returns the labels and the judge queries made."""
    routes = pairs.routes
    first_is_chosen = torch.ones(len(routes), dtype=torch.bool)
    self_labels = implicit_reward_labels(*logps[0::2], *logps[1::2], config.beta, "bernoulli", generator)
    by_policy = torch.tensor([LABELS_FROM[ROUTES[r]] == "policy" for r in routes.tolist()], dtype=torch.bool)
    first_is_chosen[by_policy] = self_labels.first_is_chosen[by_policy]
    by_judge = [i for i, r in enumerate(routes.tolist()) if LABELS_FROM[ROUTES[r]] == "oracle"]
    if not by_judge:
        return first_is_chosen, 0
    offset, k = len(routes) - len(pairs.online_prompts), config.samples_per_prompt
    online_index = [i - offset for i in by_judge]                  # judged pairs are online pairs
    judged = _judge_labels(task, [pairs.online_prompts[j] for j in online_index],
                           [pairs.online.texts[j * k] for j in online_index],
                           [pairs.online.texts[j * k + 1] for j in online_index], generator)
    first_is_chosen[by_judge] = judged.first_is_chosen
    return first_is_chosen, 2 * len(by_judge)


def pair_loss(logps, first_is_chosen: torch.Tensor, routes: torch.Tensor, config: SAILConfig):
    """``objective.sail_loss`` with (chosen, rejected) from the labels and coefficients from the routes."""
    pol1, pol2, ref1, ref2 = logps
    pick = first_is_chosen.to(pol1.device)
    response_coef, label_coef = (c.to(pol1.device) for c in config.recipe.coefficients(routes))
    return sail_loss(torch.where(pick, pol1, pol2), torch.where(pick, pol2, pol1),
                     torch.where(pick, ref1, ref2), torch.where(pick, ref2, ref1), config.beta,
                     response_coef=response_coef, label_coef=label_coef,
                     response_mode=config.response_mode, baseline=config.baseline,
                     check_finite=False)          # a non-finite log-prob: optimizer_step skips the step


def optimizer_step(loss: torch.Tensor, policy, optimizer, scaler, config: SAILConfig, accelerator) -> bool:
    """Backward, average gradients over processes, clip, step. Returns False (and leaves the
    weights untouched) if the loss or any gradient on any process is not finite."""
    optimizer.zero_grad(set_to_none=True)
    finite, unscaled = bool(torch.isfinite(loss)), False
    if finite:
        (scaler.scale(loss) if scaler else loss).backward()
        for p in policy.parameters():                                          # mean over processes
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")
        if scaler:
            scaler.unscale_(optimizer)
            unscaled = True
        finite = all(bool(torch.isfinite(p.grad).all()) for p in policy.parameters() if p.grad is not None)
    finite = bool(accelerator.reduce(torch.tensor(float(finite), device=accelerator.device), "sum")
                  == accelerator.num_processes)
    if finite:
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        scaler.step(optimizer) if scaler else optimizer.step()
    if unscaled:
        scaler.update()                                   # lowers the fp16 scale after an overflow
    return finite


def step_record(step: int, out, pairs: Pairs, config: SAILConfig, seconds: dict, counters: dict) -> dict:
    """The metrics of one step (TRL's names where it has them)."""
    response_coef, label_coef = config.recipe.coefficients(pairs.routes)
    online = pairs.online
    tokens = sum(int(r.response_mask.sum()) for r in (pairs.dataset, online) if r is not None)
    z = out.z.cpu()
    return {
        "step": step, "loss": out.loss.item(), "loss/dpo": out.dpo.mean().item(),
        "loss/response": _masked_mean(out.response, response_coef > 0),
        "loss/label": _masked_mean(out.label, label_coef > 0),
        "rewards/chosen": out.chosen_rewards.mean().item(), "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/margins": z.mean().item(), "rewards/accuracies": (z > 0).float().mean().item(),
        **{f"pairs/{name}": int((pairs.routes == i).sum()) for i, name in enumerate(ROUTES)},
        "online/response_length": online.lengths.float().mean().item() if online else None,
        "online/contains_eos": online.contains_eos.float().mean().item() if online else None,
        **{f"time/{name}": value for name, value in seconds.items()},
        "tokens_per_second": tokens / max(seconds["train"], 1e-9),
        **counters,
    }


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
def train(config: SAILConfig, policy, tokenizer, task: Task, resume: bool = False,
          accelerator: Accelerator | None = None, progress: bool = True) -> list[dict]:
    """Train ``policy`` in place with the SAIL surrogate; return the metrics of every step.

    The reference policy is a frozen copy of ``policy`` as passed in (or, for a PEFT model,
    the same weights with adapters disabled). With ``resume=True`` the run continues from
    ``output_dir/checkpoint.pt`` and ends with the same metrics as an uninterrupted run.
    """
    accelerator = accelerator or Accelerator()
    rank, main = accelerator.process_index, accelerator.is_main_process
    out = Path(config.output_dir)
    checkpoint_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    if config.route_dpo + config.route_dp > 0 and len(task.preferences) == 0:
        raise ValueError("the config routes pairs to the dataset, but task.preferences is empty")
    if config.route_pp + config.route_pr > 0 and len(task.train_prompts) == 0:
        raise ValueError("the config samples online pairs, but task.train_prompts is empty")

    policy.to(accelerator.device).train()
    reference = ReferenceModel(policy)                       # pi_ref = the policy as it starts
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(policy)
    optimizer = _make_optimizer(config, [p for p in policy.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler(accelerator.device.type) if config.mixed_precision == "fp16" else None
    counters = {"skipped_steps": 0, "truncated_prompts": 0, "judge_queries": 0}
    start = 0
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=accelerator.device, weights_only=False)
        changed = sorted(k for k, v in state["config"].items()
                         if k not in RESUMABLE_CHANGES and getattr(config, k) != v)
        if changed:
            raise ValueError(f"{checkpoint_path} was written with other settings: {changed}; "
                             f"use another output_dir or the same settings to resume")
        keys = policy.load_state_dict(state["model"], strict=False)
        trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
        if keys.unexpected_keys or trainable & set(keys.missing_keys):
            raise ValueError(f"{checkpoint_path} does not fit this policy: unexpected weights "
                             f"{keys.unexpected_keys[:3]}, missing {sorted(trainable & set(keys.missing_keys))[:3]}")
        optimizer.load_state_dict(state["optimizer"])
        start, counters = state["next_step"], state["counters"]
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    history = _open_metrics(metrics_path, config, start, resume) if main else []
    reference_scores = _reference_scores(reference, tokenizer, task, config, accelerator)

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not (progress and main),
               desc=f"train {config.output_dir}")
    for step in bar:
        seed = lambda purpose: step_seed(config.seed, step, rank, purpose)  # noqa: E731
        torch.manual_seed(seed("dropout"))        # dropout masks, if any: resumable like the rest
        t0 = time.perf_counter()
        pairs = draw_pairs(policy, tokenizer, task, config, accelerator, seed)                 # 1-2. route, sample
        t1 = time.perf_counter()
        logps = score_pairs(policy, reference, pairs, config, accelerator)                     # 3. l_theta, l_ref
        t2 = time.perf_counter()
        labels, queries = label_pairs(pairs, logps, task, config,                              # 4. labels
                                      torch.Generator().manual_seed(seed("labels")))
        t3 = time.perf_counter()
        out_loss = pair_loss(logps, labels, pairs.routes, config)                              # 5. SAIL loss
        finite = optimizer_step(out_loss.loss, policy, optimizer, scaler, config, accelerator)  # 6. step
        t4 = time.perf_counter()

        counters["truncated_prompts"] += pairs.truncated_prompts
        counters["judge_queries"] += queries
        if not finite:
            counters["skipped_steps"] += 1
            warnings.warn(f"step {step}: non-finite loss or gradient, step skipped "
                          f"({counters['skipped_steps']} so far)", RuntimeWarning)
        if not main:
            continue
        seconds = {"generate": t1 - t0, "label": t3 - t2, "train": (t2 - t1) + (t4 - t3)}
        record = step_record(step, out_loss, pairs, config, seconds, counters)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            record.update(evaluate(policy, reference, tokenizer, task, config, reference_scores, accelerator))
            bar.set_postfix(reward=f"{record['eval/judge_reward']:.3f}", kl=f"{record['eval/kl']:.2f}")
        history.append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0) or step + 1 == config.steps:
            _save_checkpoint(checkpoint_path, config, policy, optimizer, step + 1, counters, scaler)
    accelerator.wait_for_everyone()
    _check_in_sync(policy, accelerator)
    return history


# --------------------------------------------------------------------------------------
# bookkeeping
# --------------------------------------------------------------------------------------
def _enable_gradient_checkpointing(policy) -> None:
    enable = getattr(policy, "activation_checkpointing_enable", None)      # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _open_metrics(metrics_path: Path, config: SAILConfig, start: int, resume: bool) -> list[dict]:
    """Write config.json; keep the metrics of steps before ``start`` (a resumed run redoes the rest)."""
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    (metrics_path.parent / "config.json").write_text(json.dumps(asdict(config), indent=1))
    old = metrics_path.read_text().splitlines() if (resume and metrics_path.exists()) else []
    kept = [line for line in old if json.loads(line)["step"] < start]
    metrics_path.write_text("".join(line + "\n" for line in kept))
    return [json.loads(line) for line in kept]


def _reference_scores(reference: ReferenceModel, tokenizer, task: Task, config: SAILConfig, accelerator):
    """Judge scores of one reference sample per eval prompt: what the win rate compares against."""
    eval_prompts = list(task.eval_prompts[: config.eval_prompts])
    with reference.as_module() as reference_module, autocast(config, accelerator):
        samples = sample_responses(reference_module, tokenizer, eval_prompts, k=1,
                                   max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                   seed=step_seed(config.seed, -2, 0, "eval-reference"))
    return torch.as_tensor(task.judge(eval_prompts, samples.texts), dtype=torch.float32)


def _check_in_sync(policy, accelerator: Accelerator) -> None:
    """Every process must end with the same weights (gradients were averaged across them)."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in policy.parameters()]).sum().reshape(1)
    gathered = accelerator.gather(checksum)
    if not torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=1e-6, atol=1e-9):
        raise RuntimeError(f"processes ended with different weights: checksums {gathered.tolist()}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean over the pairs where a term applies (None when it applies to none)."""
    mask = mask.to(values.device)
    return values[mask].mean().item() if mask.any() else None
