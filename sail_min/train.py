r"""The SAIL training loop: draw -> score -> label -> loss -> step, on any device.

One optimiser step is five functions, each a few lines, called in order by ``train``:

  1. draw     route each of the ``pairs_per_step`` pairs to dpo / dp / pp / pr (``config.ROUTES``)
              and take its two responses y1, y2: a dataset pair (chosen, rejected), or two fresh
              samples of the CURRENT policy (nothing buffered or reused: every online pair is
              on-policy). Pair i is row i of ``pairs.first`` and of ``pairs.second``.
  2. score    l_theta(y) (with gradient) and l_ref(y) of both responses (``sail_min.logprobs``);
  3. label    dpo: the dataset (y1 = chosen); dp / pp: a draw of the policy's Bradley-Terry model
              P(y1 > y2) = sig(z); pr: the judge (``sail_min.labels``);
  4. loss     ``objective.sail_loss`` with per-pair coefficients from the route;
  5. step     backward (the engine averages gradients over processes), clipped, applied. A non-finite loss or
              gradient skips the step (weights untouched); the metrics say what was non-finite and
              the step's inputs are saved for ``replay_skipped_step``.

With ``reuse_steps = R > 1`` (iterative DPO in rounds) steps 1 and 3 run once per round of R steps:
the round's pairs and labels are reused, their log-probs (2) and the loss (4) recomputed every step, and
the response term of a reused pair weighted by pi_theta / pi_old of the pair (``objective.importance_weights``).

Every random choice of step t is seeded by (seed, t, purpose), so a run resumed from a checkpoint
draws exactly what the uninterrupted run would have drawn. Metrics go to
``output_dir/metrics.jsonl``, one line per step (TRL's names where it has them); evaluation lines
carry ``eval/*`` keys.

Multi-process (``accelerate launch``): the pairs of a step are drawn for all processes at once and
process r takes pairs [r n, (r+1) n), so W processes of n pairs draw what one process of W n pairs
would. The policy and optimiser go through ``engine.prepare`` (``accelerator.prepare``) and the engine
averages the gradients: DDP (data parallel), FSDP2 (sharded, ``fsdp_version: 2``) or DeepSpeed (untested here).
``sequence_logprobs`` runs its forward through the engine's wrapper (``logprobs._last_hidden_state``).
Process 0 logs and checkpoints; with sharded weights every process takes part in evaluation and in
gathering the checkpoint (a sharded forward needs all of them). One process: no wrapper at all.
"""
from __future__ import annotations

import functools
import json
import random
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, restore, save_checkpoint
from .config import LABELS_FROM, RESPONSES_FROM, ROUTES, SAILConfig
from .labels import PairLabels, check_judge_scores, implicit_reward_labels, reward_model_labels
from .engine import GatheredState, check_in_sync, deepspeed_step, local_shard, prepare, unwrapped
from .logprobs import ReferenceModel, has_engine, is_fully_sharded, register_engine, sequence_logprobs
from .objective import SAILLoss, baseline_groups, importance_weights, sail_loss
from .sampling import (Responses, check_positions, compile_stats, encode_responses, sample_responses,
                       truncate_prompts_left)


@dataclass
class Task:
    """What a run learns from, besides the model and the config."""

    preferences: Sequence[dict]
    """offline pairs {"prompt", "chosen", "rejected"} for dpo/dp routes (``sail_min.data`` format)"""
    train_prompts: Sequence
    """prompts for online (pp/pr) pairs"""
    eval_prompts: Sequence
    """held-out prompts for the judge reward, win rate and KL"""
    judge: Callable
    """(prompts, responses) -> scores: labels pr pairs, scores evaluation samples"""
    judge_temperature: float | None = None
    """Bradley-Terry temperature of judge labels, P(y1 > y2) = sig((s1 - s2) / T); None = argmax"""


def step_seed(seed: int, step: int, process: int, purpose: str) -> int:
    """A 63-bit seed that depends only on (seed, step, process, purpose)."""
    return random.Random(f"{seed}/{step}/{process}/{purpose}").getrandbits(63)


def autocast(config: SAILConfig, device: torch.device):
    """torch.autocast for ``config.mixed_precision`` ("no" = a disabled context: plain fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@contextmanager
def attention_kernels(config: SAILConfig):
    """PyTorch's cuDNN attention kernel off inside (unless ``config.cudnn_attention``), restored on exit.

    Its backward on H100/H200 returns NaN query gradients (the forward is fine, so is the loss) when
    an attention mask is passed, seq_len % 128 == 64 and a row's logsumexp is below -88.7 = -ln(FLT_MAX):
    pytorch/pytorch#196678. Both the forward and the backward must run inside: the kernel of the
    backward is chosen in the forward, except under gradient checkpointing, which re-runs the
    attention forward during backward. The flag is process-global (no effect on a CPU)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(before and config.cudnn_attention)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def sample(model, tokenizer, prompts: Sequence, config: SAILConfig, k: int, seed: int, rows: int,
           cache: str | None = None) -> Responses:
    """k samples per prompt with the config's generation settings; ``rows`` is the batch size the
    static cache pads to with ``generation_shapes="fixed"`` (one shape per call site, so a run
    compiles twice at most: training samples and evaluation)."""
    cache = config.generation_cache if cache is None else cache
    fixed = cache == "static" and config.generation_shapes == "fixed"
    with autocast(config, next(model.parameters()).device):
        return sample_responses(model, tokenizer, prompts, k=k, max_new_tokens=config.max_new_tokens,
                                temperature=config.temperature, seed=seed,
                                cache_implementation="static" if cache == "static" else None,
                                compile=config.generation_compile, isolate=config.cudagraph_isolation,
                                batch_rows=rows if fixed else None, text_prompts=config.text_prompts,
                                prompt_length=config.max_prompt_tokens if fixed else None)


# --------------------------------------------------------------------------------------
# 1. draw
# --------------------------------------------------------------------------------------
@dataclass
class StepPairs:
    """One step's pairs, row-aligned: pair i is (prompts[i], first row i, second row i).
    Dataset pairs come first (y1 = chosen, y2 = rejected), then online pairs."""

    routes: torch.Tensor      # [N] long, index into config.ROUTES
    prompts: list             # [N] the (truncated) prompt of each pair
    first: Responses          # y1 of every pair
    second: Responses         # y2 of every pair
    truncated_prompts: int    # prompts cut to max_prompt_tokens in this step


def draw_pairs(policy, tokenizer, task: Task, config: SAILConfig, step: int, process: int = 0,
               processes: int = 1) -> StepPairs:
    """Route every pair, then take its responses: from the dataset, or fresh samples of pi_theta.

    Dataset pairs are read in shuffled passes: the d-th draw's pair slot j (of n x processes) holds row
    permutation_e[(d n W + j) mod N] of pass e, so offline DPO sees every row once per pass; a slot routed
    online skips its row in that pass. Online prompts are drawn uniformly."""
    rng = random.Random(step_seed(config.seed, step, 0, "data"))       # one draw for all processes
    n = config.pairs_per_step
    routes = rng.choices(range(len(ROUTES)), weights=config.route_probs, k=n * processes)
    from_dataset = [RESPONSES_FROM[ROUTES[r]] == "dataset" for r in routes]
    first_slot = (step // config.reuse_steps) * n * processes          # slots of all earlier draws
    rows = {i: task.preferences[dataset_row(config.seed, first_slot + i, len(task.preferences))]
            for i in range(len(routes)) if from_dataset[i]}
    online = {i: task.train_prompts[rng.randrange(len(task.train_prompts))] for i in range(len(routes))
              if not from_dataset[i]}
    mine = range(process * n, (process + 1) * n)                         # this process's pairs
    dataset_pairs, online_pairs = [i for i in mine if i in rows], [i for i in mine if i in online]
    rows, online = [rows[i] for i in dataset_pairs], [online[i] for i in online_pairs]
    dataset_prompts, cut_dataset = truncate_prompts_left(tokenizer, [r["prompt"] for r in rows], config.max_prompt_tokens,
                                                         config.text_prompts)
    online_prompts, cut_online = truncate_prompts_left(tokenizer, online, config.max_prompt_tokens, config.text_prompts)

    firsts, seconds = [], []
    if rows:                                          # y1 = chosen, y2 = rejected
        firsts.append(encode_responses(tokenizer, dataset_prompts, [r["chosen"] for r in rows], config.text_prompts))
        seconds.append(encode_responses(tokenizer, dataset_prompts, [r["rejected"] for r in rows], config.text_prompts))
    if online:                                        # y1, y2 ~ pi_theta(. | x): rows 2i and 2i + 1
        samples = sample(policy, tokenizer, online_prompts, config, k=2,
                         seed=step_seed(config.seed, step, process, "sample"), rows=2 * n)
        firsts.append(samples.select(slice(0, None, 2)))
        seconds.append(samples.select(slice(1, None, 2)))
    elif is_fully_sharded(policy) and not all(from_dataset):
        # sharded weights: another process samples this step, and its passes gather weights from this one
        sample(policy, tokenizer, task.train_prompts[:1], config, k=1, seed=step_seed(config.seed, step, process,
               "sample"), rows=2 * n)
    return StepPairs(torch.tensor([routes[i] for i in dataset_pairs + online_pairs]), dataset_prompts + online_prompts,
                     Responses.cat(firsts, tokenizer.pad_token_id), Responses.cat(seconds, tokenizer.pad_token_id),
                     cut_dataset + cut_online)


def dataset_row(seed: int, slot: int, rows: int) -> int:
    """Row of the dataset at global slot ``slot``: passes over a fresh permutation each."""
    return _permutation(seed, slot // rows, rows)[slot % rows]


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, rows: int) -> list[int]:
    order = list(range(rows))
    random.Random(step_seed(seed, epoch, 0, "dataset-pass")).shuffle(order)
    return order


# --------------------------------------------------------------------------------------
# 2. score
# --------------------------------------------------------------------------------------
@dataclass
class PairLogps:
    """l_theta (with gradient) and l_ref of y1 and y2, one value per pair."""

    policy_first: torch.Tensor
    policy_second: torch.Tensor
    ref_first: torch.Tensor
    ref_second: torch.Tensor


def score_pairs(policy, reference: ReferenceModel, pairs: StepPairs, config: SAILConfig) -> PairLogps:
    """One forward pass over [y1 rows; y2 rows] for the policy and one for the reference."""
    return _score(policy, reference, pair_inputs(pairs), len(pairs.first), config)


def pair_inputs(pairs: StepPairs) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, response_mask of [y1 rows; y2 rows] (``sequence_logprobs``'s inputs)."""
    return Responses.cat([pairs.first, pairs.second], pad_token_id=0).model_inputs()   # pads are masked


def _score(policy, reference: ReferenceModel, inputs: dict, n: int, config: SAILConfig) -> PairLogps:
    device = next(policy.parameters()).device
    inputs = {key: value.to(device) for key, value in inputs.items()}
    with autocast(config, device), attention_kernels(config):
        policy_logps = sequence_logprobs(policy, **inputs)
        ref_logps = reference.logprobs(**inputs)
    return PairLogps(policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:])


# --------------------------------------------------------------------------------------
# 3. label
# --------------------------------------------------------------------------------------
def label_pairs(pairs: StepPairs, logps: PairLogps, task: Task, config: SAILConfig,
                generator: torch.Generator) -> tuple[PairLabels, int]:
    """Is y1 the chosen response? Returns the labels and the judge calls made (2 per judged pair)."""
    labels_from = [LABELS_FROM[ROUTES[r]] for r in pairs.routes.tolist()]
    first_is_chosen = torch.ones(len(labels_from), dtype=torch.bool)                   # dataset: y1 = chosen
    self_labels = implicit_reward_labels(logps.policy_first, logps.ref_first, logps.policy_second,
                                         logps.ref_second, config.beta, "bernoulli", generator)
    by_policy = torch.tensor([source == "policy" for source in labels_from])
    if config.self_labels == "sampled":               # "expected": the loss averages the label out (pair order kept)
        first_is_chosen[by_policy] = self_labels.first_is_chosen[by_policy]            # y1 wins w.p. sig(z)
    judged = [i for i, source in enumerate(labels_from) if source == "judge"]
    if judged:
        judge = task.judge
        if task.judge_temperature is not None:                                         # P = sig((s1 - s2) / T)
            def judge(prompts, responses):
                return check_judge_scores(task.judge(prompts, responses), len(prompts), task.judge) / task.judge_temperature
        verdict = reward_model_labels(judge, [pairs.prompts[i] for i in judged],
                                      [pairs.first.texts[i] for i in judged], [pairs.second.texts[i] for i in judged],
                                      rule="argmax" if task.judge_temperature is None else "bernoulli",
                                      generator=generator)
        first_is_chosen[judged] = verdict.first_is_chosen
    return PairLabels(first_is_chosen), 2 * len(judged)


# --------------------------------------------------------------------------------------
# 4. loss
# --------------------------------------------------------------------------------------
def pair_loss(logps: PairLogps, labels: PairLabels, routes: torch.Tensor, config: SAILConfig,
              old_logps: torch.Tensor | None = None) -> SAILLoss:
    """``objective.sail_loss`` on (chosen, rejected) as labelled, coefficients from the routes; the
    response term's leave-one-out baseline is taken within each route (``objective.baseline_groups``,
    as in the bandit). ``old_logps``: l(y1) + l(y2) at the step that drew the pairs (a reused round,
    ``reuse_steps > 1``): the response term gets the importance weight pi_theta / pi_old of the pair
    (``objective.importance_weights``), so it stays unbiased on reused pairs."""
    importance = None
    if old_logps is not None:
        importance = importance_weights(logps.policy_first + logps.policy_second, old_logps.to(logps.policy_first.device))
    policy_chosen, policy_rejected = labels.chosen_rejected(logps.policy_first, logps.policy_second)
    ref_chosen, ref_rejected = labels.chosen_rejected(logps.ref_first, logps.ref_second)
    response_coef, label_coef = (c.to(policy_chosen.device) for c in config.coefficients(routes))
    expected = None
    if config.self_labels == "expected":
        expected = torch.tensor([LABELS_FROM[ROUTES[r]] == "policy" for r in routes.tolist()])
    return sail_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config.beta,
                     response_coef=response_coef, label_coef=label_coef, response_mode=config.response_mode,
                     baseline=config.baseline, groups=baseline_groups(routes.to(policy_chosen.device)),
                     public_hook_scale=config.public_hook_scale, expected_labels=expected, response_importance=importance,
                     check_finite=False)                                               # non-finite: step skipped


def term_gradient_norms(loss: SAILLoss, policy, routes: torch.Tensor, config: SAILConfig) -> dict:
    """||grad|| of each term of the loss on its own (logged at evaluations). A term whose coefficients
    are all 0 has no gradient; when both extra terms are off the DPO term's norm is the total gradient's
    (filled in from the step), so plain DPO runs pay no extra backward pass, SAIL runs one or two."""
    response_coef, label_coef = config.coefficients(routes)
    active = {"response": bool(response_coef.any()) and config.response_mode != "off", "label": bool(label_coef.any())}
    norms = {f"grad_norm/{name}": 0.0 for name, on in active.items() if not on}
    if not any(active.values()):
        return norms                                   # grad_norm/dpo = the step's grad_norm
    params = [p for p in policy.parameters() if p.requires_grad]
    for name in ("dpo", *(name for name, on in active.items() if on)):
        with attention_kernels(config):
            grads = [g for g in torch.autograd.grad(loss.parts[name], params, retain_graph=True, allow_unused=True)
                     if g is not None]
        norms[f"grad_norm/{name}"] = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item() if grads else 0.0
    return norms


# --------------------------------------------------------------------------------------
# 5. step
# --------------------------------------------------------------------------------------
def optimizer_step(loss: torch.Tensor, policy, optimizer, config: SAILConfig, scaler=None,
                   accelerator: Accelerator | None = None) -> float | None:
    """Backward, clip, step. Several processes: ``policy`` was prepared by ``train`` (DDP, FSDP2),
    whose engine averages the gradients during backward. Returns the gradient norm before clipping,
    or None (and leaves the weights untouched) if the loss or any gradient on any process is not finite."""
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        with attention_kernels(config):
            return deepspeed_step(loss, optimizer, accelerator)
    if accelerator.num_processes > 1 and not has_engine(policy):
        raise RuntimeError("several processes but the policy has no engine to average its gradients: "
                           "prepare it as train() does (_prepare)")
    optimizer.zero_grad(set_to_none=True)
    finite, unscaled = bool(torch.isfinite(loss)), False
    if finite:
        with attention_kernels(config):                                       # checkpointing re-runs attention here
            (scaler.scale(loss) if scaler else loss).backward()               # the engine averages here
        if scaler:
            scaler.unscale_(optimizer)
            unscaled = True
        finite = all(bool(torch.isfinite(local_shard(p.grad)).all()) for p in policy.parameters() if p.grad is not None)
    if accelerator.num_processes > 1:
        finite = bool(accelerator.reduce(torch.tensor(float(finite), device=accelerator.device), "sum")
                      == accelerator.num_processes)
    norm = None
    if finite:                                            # DTensors (FSDP2): the global norm
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm or float("inf")).item()
        scaler.step(optimizer) if scaler else optimizer.step()
    if unscaled:
        scaler.update()                                   # lowers the fp16 scale after an overflow
    return norm


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------
def judge_samples(model, tokenizer, task: Task, config: SAILConfig, seed: int, cache: str | None = None):
    """One sample per held-out prompt (truncated like training prompts) and its judge score."""
    prompts, _ = truncate_prompts_left(tokenizer, list(task.eval_prompts[: config.eval_prompts]),
                                       config.max_prompt_tokens, config.text_prompts)
    samples = sample(model, tokenizer, prompts, config, k=1, seed=seed, rows=len(prompts), cache=cache)
    return samples, check_judge_scores(task.judge(prompts, samples.texts), len(prompts), task.judge)


def reference_scores(reference: ReferenceModel, tokenizer, task: Task, config: SAILConfig) -> torch.Tensor:
    """Judge scores of one reference sample per eval prompt: what the win rate compares against.
    Sampled once per run with the dynamic cache (a compiled graph would be built for pi_ref alone)."""
    with reference.as_module() as reference_module:
        _, scores = judge_samples(reference_module, tokenizer, task, config,
                                  step_seed(config.seed, -2, 0, "eval-reference"), cache="dynamic")
    return scores


@torch.no_grad()
def evaluate(policy, reference: ReferenceModel, tokenizer, task: Task, config: SAILConfig,
             baseline_scores: torch.Tensor) -> dict:
    """Judge reward, win rate vs the reference's samples and KL(pi || pi_ref) on held-out prompts.

    KL is the Monte-Carlo estimate E_{y ~ pi}[l_theta(y|x) - l_ref(y|x)] on one sample per prompt;
    win rate counts ties as 1/2. Sampling uses a fixed seed, so steps are comparable.
    """
    samples, scores = judge_samples(policy, tokenizer, task, config, step_seed(config.seed, -1, 0, "eval"))
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    inputs = {key: value.to(device) for key, value in samples.model_inputs().items()}
    with autocast(config, device):
        kl = (sequence_logprobs(policy, **inputs) - reference.logprobs(**inputs)).float()
    policy.train(was_training)
    wins = (scores > baseline_scores).float() + 0.5 * (scores == baseline_scores).float()
    return {"eval/judge_reward": scores.mean().item(), "eval/judge_reward_std": scores.std().item(),
            "eval/reference_judge_reward": baseline_scores.mean().item(),
            "eval/win_rate": wins.mean().item(), "eval/kl": kl.mean().item(),
            "eval/response_length": samples.lengths.float().mean().item(),
            "eval/contains_eos": samples.contains_eos.float().mean().item()}


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
    _check_task(task, config)
    check_positions(policy, config.max_prompt_tokens, config.max_new_tokens)

    policy.to(accelerator.device).train()
    reference = ReferenceModel(policy)                       # pi_ref = the policy as it starts
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    optimizer = _make_optimizer(config, [p for p in policy.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler(accelerator.device.type) if config.mixed_precision == "fp16" else None
    counters = {"skipped_steps": 0, "truncated_prompts": 0, "judge_queries": 0}
    start = 0
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and config.route_pp + config.route_pr > 0:
        raise NotImplementedError("online routes (pp, pr) under DeepSpeed: sampling through the engine is not "
                                  "written; use FSDP2 (accelerate_fsdp.yaml) or data parallel")
    if resume and (out / "checkpoint.pt").exists():
        if sharded:
            raise NotImplementedError("resuming a sharded (FSDP / DeepSpeed) run is not implemented: its checkpoint "
                                      "holds the gathered trainable weights, load them into the model to start over")
        state = load_checkpoint(out / "checkpoint.pt", map_location=accelerator.device)
        start, counters = restore(state, policy, optimizer, scaler, config=config.to_dict(), path=out / "checkpoint.pt")
    policy, optimizer = prepare(policy, optimizer, reference, accelerator)   # DDP / FSDP2 / DeepSpeed; 1 process: as is
    history = _open_metrics(out, config, start, resume) if main else []
    compiled_before = compile_stats()                                   # the run's compilations, from here
    baseline_scores = reference_scores(reference, tokenizer, task, config)
    judge_truncated_before = getattr(task.judge, "truncated", 0)      # judge inputs cut to its length

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not (progress and main),
               desc=f"train {config.output_dir}")
    for step in bar:
        torch.manual_seed(step_seed(config.seed, step, rank, "dropout"))      # dropout masks, if any
        t0 = time.perf_counter()
        new_round = step % config.reuse_steps == 0 or step == start           # reuse_steps > 1: iterative rounds
        evaluating = main and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps)
        # ---------------------------------- ALGORITHM ----------------------------------
        if new_round:
            pairs = draw_pairs(policy, tokenizer, task, config, step, rank, accelerator.num_processes)  # 1. draw
        t1 = time.perf_counter()
        logps = score_pairs(policy, reference, pairs, config)                                        # 2. score
        if new_round:                                  # l_old of the round's pairs: reused pairs are importance-weighted
            round_logps = (logps.policy_first + logps.policy_second).detach()
        t2 = time.perf_counter()
        if new_round:
            labels, judge_calls = label_pairs(pairs, logps, task, config,                            # 3. label
                                              torch.Generator().manual_seed(step_seed(config.seed, step, rank, "labels")))
        t3 = time.perf_counter()
        loss = pair_loss(logps, labels, pairs.routes, config,                                        # 4. loss
                         round_logps if config.reuse_steps > 1 else None)
        term_norms = (term_gradient_norms(loss, policy, pairs.routes, config)
                      if evaluating and accelerator.num_processes == 1 else {})
        grad_norm = optimizer_step(loss.loss, policy, optimizer, config, scaler, accelerator)        # 5. step
        finite = grad_norm is not None
        t4 = time.perf_counter()
        # -------------------------------- BOOKKEEPING ----------------------------------
        counters["truncated_prompts"] += pairs.truncated_prompts if new_round else 0
        counters["judge_queries"] += judge_calls if new_round else 0
        skipped = {}
        if not finite:
            counters["skipped_steps"] += 1
            skipped = explain_skipped_step(out / "skipped" / f"step_{step:06d}.pt", pairs, logps, labels, loss,
                                           policy, config, step)
            warnings.warn(f"step {step}: non-finite loss or gradient, step skipped ({counters['skipped_steps']} "
                          f"so far): {skipped['skip/what']}; inputs saved to {skipped['skip/inputs']}", RuntimeWarning)
        if not main:
            if sharded:                     # sharded weights: every process takes part in what process 0 does
                if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                    evaluate(policy, reference, tokenizer, task, config, baseline_scores)
                if (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0) or step + 1 == config.steps:
                    GatheredState(policy, optimizer)
            continue
        seconds = {"generate": t1 - t0, "label": t3 - t2, "train": (t2 - t1) + (t4 - t3)}
        record = step_record(step, loss, pairs, config, seconds, counters, compiled_before) | skipped | term_norms
        record["grad_norm"] = grad_norm                                   # before clipping
        if term_norms and "grad_norm/dpo" not in term_norms:              # no extra term: DPO is the total
            record["grad_norm/dpo"] = grad_norm
        record["clipped"] = bool(config.max_grad_norm and finite and grad_norm > config.max_grad_norm)
        record["judge_truncated_inputs"] = getattr(task.judge, "truncated", 0) - judge_truncated_before
        if evaluating:
            t5 = time.perf_counter()
            record.update(evaluate(policy, reference, tokenizer, task, config, baseline_scores))
            record["time/evaluate"] = time.perf_counter() - t5
            record.update({f"compile/{k}": v - compiled_before[k] for k, v in compile_stats().items()})
            bar.set_postfix(reward=f"{record['eval/judge_reward']:.3f}", kl=f"{record['eval/kl']:.2f}")
        history.append(record)
        if accelerator.trackers:                      # --report-to tensorboard / wandb (accelerate's trackers)
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                            step=step)
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0) or step + 1 == config.steps:
            gathered = GatheredState(policy, optimizer) if sharded else None      # full tensors, not this process's shards
            save_checkpoint(out / "checkpoint.pt", model=gathered or policy, optimizer=gathered or optimizer,
                            next_step=step + 1, counters=counters, config=config.to_dict(), scaler=scaler)
    accelerator.wait_for_everyone()
    check_in_sync(policy, accelerator)
    register_engine(unwrapped(policy), None)
    return history


def step_record(step: int, loss: SAILLoss, pairs: StepPairs, config: SAILConfig, seconds: dict, counters: dict,
                compiled_before: dict) -> dict:
    """The metrics of one step (TRL's names where it has them)."""
    response_coef, label_coef = config.coefficients(pairs.routes)
    online = pairs.routes >= ROUTES.index("pp")
    lengths = torch.cat([pairs.first.lengths, pairs.second.lengths]).float()
    with_eos = torch.cat([pairs.first.contains_eos, pairs.second.contains_eos]).float()
    tokens = int(lengths.sum())
    z = loss.z.cpu()
    return {
        "step": step, "loss": loss.loss.item(), "loss/dpo": loss.dpo.mean().item(),
        "loss/response": _masked_mean(loss.response, response_coef > 0),
        "loss/label": _masked_mean(loss.label, label_coef > 0),
        "rewards/chosen": loss.chosen_rewards.mean().item(), "rewards/rejected": loss.rejected_rewards.mean().item(),
        "rewards/margins": z.mean().item(), "rewards/accuracies": (z > 0).float().mean().item(),
        **{f"pairs/{name}": int((pairs.routes == i).sum()) for i, name in enumerate(ROUTES)},
        "online/response_length": lengths[online.repeat(2)].mean().item() if online.any() else None,
        "online/contains_eos": with_eos[online.repeat(2)].mean().item() if online.any() else None,
        **{f"time/{name}": value for name, value in seconds.items()},
        "tokens_per_second": tokens / max(seconds["train"], 1e-9),
        **{f"compile/{k}": v - compiled_before[k] for k, v in compile_stats().items()},
        **counters,
    }


# --------------------------------------------------------------------------------------
# a skipped step explains itself
# --------------------------------------------------------------------------------------
def explain_skipped_step(path: Path, pairs: StepPairs, logps: PairLogps, labels: PairLabels, loss: SAILLoss,
                         policy, config: SAILConfig, step: int) -> dict:
    """What was non-finite (the loss, which log-prob rows, which parameter gradients), as metrics,
    and the step's inputs saved to ``path`` for ``replay_skipped_step``."""
    bad_rows = {name: (~torch.isfinite(value.detach())).nonzero().flatten().tolist()
                for name, value in vars(logps).items()}
    bad_grads = [name for name, p in policy.named_parameters()
                 if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    what = [] if bool(torch.isfinite(loss.loss)) else ["loss"]
    what += [f"{name} rows {rows[:8]}" for name, rows in bad_rows.items() if rows]
    what += [f"gradient of {len(bad_grads)} tensors, first {bad_grads[0]}"] if bad_grads else []
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "config": config.to_dict(), "routes": pairs.routes.cpu(),
                "inputs": {k: v.cpu() for k, v in pair_inputs(pairs).items()},
                "first_is_chosen": labels.first_is_chosen.cpu(),
                "trainable": {n: p.detach().cpu() for n, p in policy.named_parameters() if p.requires_grad}}, path)
    return {"skip/what": "; ".join(what) or "gradient of another process", "skip/nonfinite_logp_rows": bad_rows,
            "skip/nonfinite_grads": bad_grads[:20], "skip/inputs": str(path)}


def replay_skipped_step(path: str | Path, policy, **overrides) -> dict:
    """Recompute a skipped step from its saved inputs on ``policy`` (built as for the run: the same
    base model, LoRA included), with the trainable weights as they were; return what is non-finite.
    ``overrides`` change the run's settings for the replay, one suspect at a time, e.g.
    ``cudnn_attention=True`` (PyTorch's cuDNN attention kernel), ``mixed_precision="no"`` (fp32).

        from sail_min.train import replay_skipped_step; print(replay_skipped_step("outputs/run/skipped/step_000012.pt", policy))
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = SAILConfig.from_dict({**state["config"], **overrides})
    reference = ReferenceModel(policy)                 # a PEFT policy: its base; else the weights as loaded
    policy.load_state_dict(state["trainable"], strict=False)
    policy.train()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    logps = _score(policy, reference, state["inputs"], len(state["routes"]), config)
    loss = pair_loss(logps, PairLabels(state["first_is_chosen"]), state["routes"], config)
    policy.zero_grad(set_to_none=True)
    if torch.isfinite(loss.loss):
        with attention_kernels(config):
            loss.loss.backward()
    return {"loss": loss.loss.item(),
            "nonfinite_logp_rows": {k: (~torch.isfinite(v.detach())).nonzero().flatten().tolist()
                                    for k, v in vars(logps).items()},
            "nonfinite_grads": [name for name, p in policy.named_parameters()
                                if p.grad is not None and not bool(torch.isfinite(p.grad).all())]}


# --------------------------------------------------------------------------------------
# bookkeeping
# --------------------------------------------------------------------------------------
def _check_task(task: Task, config: SAILConfig) -> None:
    if config.route_dpo + config.route_dp > 0 and len(task.preferences) == 0:
        raise ValueError("the config routes pairs to the dataset, but task.preferences is empty")
    if config.route_pp + config.route_pr > 0 and len(task.train_prompts) == 0:
        raise ValueError("the config samples online pairs, but task.train_prompts is empty")
    if len(task.eval_prompts) == 0:
        raise ValueError("task.eval_prompts is empty: evaluation needs held-out prompts")


def _make_optimizer(config: SAILConfig, params):
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def enable_gradient_checkpointing(policy) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (what ``gradient_checkpointing`` turns on)."""
    enable = getattr(policy, "activation_checkpointing_enable", None)      # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _open_metrics(out: Path, config: SAILConfig, start: int, resume: bool) -> list[dict]:
    """Write config.json; keep the metrics of steps before ``start`` (a resumed run redoes the rest).
    A half-written last line (a run killed while writing) is dropped."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    metrics_path = out / "metrics.jsonl"
    kept = []
    for number, line in enumerate(metrics_path.read_text().splitlines() if (resume and metrics_path.exists()) else []):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{metrics_path} line {number + 1} is not complete JSON (a run killed while writing?): "
                          "dropped, the step is redone", RuntimeWarning)
            continue
        if record.get("step", start) < start:
            kept.append(record)
    metrics_path.write_text("".join(json.dumps(record) + "\n" for record in kept))
    return kept


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean over the pairs where a term applies (None when it applies to none)."""
    mask = mask.to(values.device)
    return values[mask].mean().item() if mask.any() else None
