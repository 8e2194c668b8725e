r"""The SAIL training loop: draw -> score -> label -> loss -> step, on any device.

One optimiser step is four functions and the four lines of any PyTorch step, in order in ``train``:

  1. draw     route each of the ``pairs_per_step`` pairs to dpo / dp / pp / pr (``config.ROUTES``)
              and take its two responses y1, y2: a dataset pair (chosen, rejected), or two fresh
              samples of the CURRENT policy (nothing buffered or reused: every online pair is
              on-policy). Pair i is row i of ``pairs.first`` and of ``pairs.second``.
  2. score    l_theta(y) (with gradient) and l_ref(y) of both responses (``sail_min.logprobs``);
  3. label    dpo: the dataset (y1 = chosen); dp / pp: a draw of the policy's Bradley-Terry model
              P(y1 > y2) = sig(z); pr: the judge (``sail_min.labels``);
  4. loss     ``objective.sail_loss`` with per-pair coefficients from the route;
  5. step     zero_grad, then ``Runtime.step``: backward (DDP / FSDP2 average gradients over processes),
              clip, optimizer step. A loss or gradient that is not finite on some process skips the step on
              all (weights untouched); the metrics say what was non-finite and the step's inputs are saved
              for ``replay_skipped_step``.

With ``reuse_steps = R > 1`` (iterative DPO in rounds) steps 1 and 3 run once per round of R steps:
the round's pairs and labels are reused, their log-probs (2) and the loss (4) recomputed every step. What was
drawn at the round's label step (theta_old) is importance-weighted (``routes.reuse_weights``, clipped): a policy
pair by pi_theta / pi_old of the pair, a drawn self-label (dp, pp) by P_theta(label) / P_old(label), so that the
reused pair's gradient has the expectation of a fresh one, up to the clip's bias (``objective.importance_weights``).

Every random choice of step t is seeded by (seed, t, purpose), so a run resumed from a checkpoint
draws exactly what the uninterrupted run would have drawn. Metrics go to
``output_dir/metrics.jsonl``, one line per step (TRL's names where it has them); evaluation lines
carry ``eval/*`` keys.

Everything about HOW the step runs (devices, processes, precision, attention kernels, gradient
checkpointing, the engine that averages gradients, the static-cache sampler) is the ``runtime.Runtime``
under the loop; diagnostics of skipped steps and per-term gradient norms are in ``diagnostics.py``,
the metrics file in ``metrics.py``. A step can be read here and in the math modules alone.

Multi-process (``accelerate launch``): the pairs of a step are drawn for all processes at once and
process r takes pairs [r n, (r+1) n), so W processes of n pairs draw what one process of W n pairs
would; the runtime's engine (DDP or FSDP2) averages the gradients. Process 0 logs and
checkpoints; with sharded weights every process takes part in evaluation and in gathering the
checkpoint (a sharded forward needs all of them). One process: no wrapper at all.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, remove_stray_temporaries, restore
from .config import LABELS_FROM, RESPONSES_FROM, ROUTES, SAILConfig
from .diagnostics import explain_skipped_step, term_gradient_norms
from .runtime import Runtime, attention_kernels, enable_gradient_checkpointing
from .labels import (CheckedJudge, JudgeError, PairLabels, check_judge_scores, implicit_reward_labels,  # noqa: F401
                     reward_model_labels)
from .logprobs import ReferenceModel, eval_mode
from .metrics import append_metrics, compilations_since, kl_estimates, open_metrics, standard_error, step_record
from .objective import SAILLoss
from .routes import route_loss
from .sampling import (Responses, Sampler, check_positions, compile_stats, encode_responses, manual_seed,
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
    truncated_responses: int = 0  # dataset responses (chosen or rejected) cut to max_completion_tokens

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, response_mask of [y1 rows; y2 rows] (``sequence_logprobs``' inputs)."""
        return Responses.cat([self.first, self.second], pad_token_id=0).model_inputs()   # pads are masked


def draw_pairs(policy, sampler: Sampler, task: Task, config: SAILConfig, step: int, process: int = 0,
               processes: int = 1) -> StepPairs:
    """Route every pair, then take its responses: from the dataset, or fresh samples of pi_theta
    (``sampler``: the run's training sampler, ``Runtime.sampler``; its tokenizer is the policy's).

    Dataset pairs are read in shuffled passes: the d-th draw's pair slot j (of n x processes) holds row
    permutation_e[(d n W + j) mod N] of pass e, so offline DPO sees every row once per pass; a slot routed
    online skips its row in that pass. Online prompts are drawn uniformly."""
    rng = random.Random(step_seed(config.seed, step, 0, "data"))       # one draw for all processes
    tokenizer = sampler.tokenizer
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
                                                         config.prompt_format)
    online_prompts, cut_online = truncate_prompts_left(tokenizer, online, config.max_prompt_tokens, config.prompt_format)

    firsts, seconds, cut_responses = [], [], 0
    if rows:                           # y1 = chosen, y2 = rejected, encoded together, cut to max_completion_tokens
        both = encode_responses(tokenizer, dataset_prompts * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows],
                                config.prompt_format, max_tokens=config.max_completion_tokens)
        firsts.append(both.select(slice(0, len(rows))))
        seconds.append(both.select(slice(len(rows), None)))
        cut_responses = int((~both.contains_eos).sum())
    if not all(from_dataset):                         # y1, y2 ~ pi_theta(. | x): rows 2i and 2i + 1
        samples = sampler(policy, online_prompts, k=2, seed=step_seed(config.seed, step, process, "sample"))
        if online:                                    # none of mine: None (sharded: it joined the others' passes)
            firsts.append(samples.select(slice(0, None, 2)))
            seconds.append(samples.select(slice(1, None, 2)))
    return StepPairs(torch.tensor([routes[i] for i in dataset_pairs + online_pairs]), dataset_prompts + online_prompts,
                     Responses.cat(firsts, tokenizer.pad_token_id), Responses.cat(seconds, tokenizer.pad_token_id),
                     cut_dataset + cut_online, cut_responses)


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


def score_pairs(policy, reference: ReferenceModel, pairs: StepPairs, runtime: Runtime) -> PairLogps:
    """One forward pass over [y1 rows; y2 rows] for the policy and one for the reference."""
    return score_inputs(policy, reference, pairs.model_inputs(), len(pairs.first), runtime)


def score_inputs(policy, reference: ReferenceModel, inputs: dict, n: int, runtime: Runtime) -> PairLogps:
    """``score_pairs`` on a batch's tensors (rows [y1 of n pairs; y2 of n pairs]), e.g. a saved step's."""
    inputs = {key: value.to(runtime.device) for key, value in inputs.items()}
    with runtime.forward():                                # autocast, attention kernels
        policy_logps = runtime.logprobs(policy, inputs)    # l_theta(y | x), with gradient
        ref_logps = runtime.reference_logprobs(reference, inputs)
    return PairLogps(policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:])


# --------------------------------------------------------------------------------------
# 3. label
# --------------------------------------------------------------------------------------
def label_pairs(pairs: StepPairs, logps: PairLogps, task: Task, config: SAILConfig,
                generator: torch.Generator) -> tuple[PairLabels, int]:
    """Is y1 the chosen response? Returns the labels and the judge queries made (responses scored: 2 per
    judged pair)."""
    labels_from = [LABELS_FROM[ROUTES[r]] for r in pairs.routes.tolist()]
    first_is_chosen = torch.ones(len(labels_from), dtype=torch.bool)                   # dataset: y1 = chosen
    self_labels = implicit_reward_labels(logps.policy_first, logps.policy_second, logps.ref_first,
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
              old_logps: PairLogps | None = None) -> SAILLoss:
    """The loss of the step's pairs: (chosen, rejected) as labelled, then ``routes.route_loss`` (the same
    function as the bandit's): coefficients from the routes, the leave-one-out baseline within each route,
    self-labels averaged out if the config says so. ``old_logps``: the log-probs at the round's label step,
    where the pairs and labels were drawn (a reused round, ``reuse_steps > 1``): the pair and a drawn self-label
    get the importance weights of ``routes.reuse_weights``."""
    policy_chosen, policy_rejected = labels.chosen_rejected(logps.policy_first, logps.policy_second)
    ref_chosen, ref_rejected = labels.chosen_rejected(logps.ref_first, logps.ref_second)
    old = None if old_logps is None else labels.chosen_rejected(old_logps.policy_first, old_logps.policy_second)
    return route_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, routes, config,
                      old_logps=old, check_finite=False)                             # non-finite: step skipped


# --------------------------------------------------------------------------------------
# 5. step: zero_grad, backward, clip, step, in ``train`` (the runtime makes them process- and precision-aware)
# --------------------------------------------------------------------------------------
def make_optimizer(config: SAILConfig, policy) -> torch.optim.Optimizer:
    """AdamW (or the public code's RMSprop) over the trainable weights."""
    params = [p for p in policy.parameters() if p.requires_grad]
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------
def judge_samples(model, sampler: Sampler, task: Task, config: SAILConfig, seed: int):
    """One sample per held-out prompt (truncated like training prompts) and its judge score."""
    prompts, _ = truncate_prompts_left(sampler.tokenizer, list(task.eval_prompts[: config.eval_prompts]),
                                       config.max_prompt_tokens, config.prompt_format)
    samples = sampler(model, prompts, k=1, seed=seed)
    return samples, check_judge_scores(task.judge(prompts, samples.texts), len(prompts), task.judge)


def reference_scores(reference: ReferenceModel, tokenizer, task: Task, runtime: Runtime) -> torch.Tensor:
    """Judge scores of one reference sample per eval prompt: what the win rate compares against.
    Sampled once per run with the dynamic cache (a compiled graph would be built for pi_ref alone)."""
    config = runtime.config
    sampler = runtime.sampler(tokenizer, rows=min(config.eval_prompts, len(task.eval_prompts)), cache="dynamic")
    with reference.as_module() as reference_module:
        _, scores = judge_samples(reference_module, sampler, task, config,
                                  step_seed(config.seed, -2, 0, "eval-reference"))
    return scores


@torch.no_grad()
def evaluate(policy, reference: ReferenceModel, sampler: Sampler, task: Task, runtime: Runtime,
             reference_judge_scores: torch.Tensor) -> dict:
    """Judge reward, win rate vs the reference's samples and KL(pi || pi_ref) on held-out prompts.

    KL is estimated twice on one sample per prompt (``metrics.kl_estimates``): ``eval/kl`` is the mean of
    k1 = l_theta(y|x) - l_ref(y|x) (it can fall below 0 by chance when pi is close to pi_ref), ``eval/kl_k3``
    the mean of k3 = (r - 1) - log r, r = pi_ref(y|x) / pi(y|x) (never below 0), each with its standard error;
    the *_std keys are standard deviations over the prompts; win rate counts ties as 1/2, and ``eval/ties`` is
    their share (pairs the judge cannot tell apart: as labels, coin flips). Sampling uses a fixed seed, so steps
    are comparable."""
    config = runtime.config
    samples, scores = judge_samples(policy, sampler, task, config, step_seed(config.seed, -1, 0, "eval"))
    inputs = {key: value.to(runtime.device) for key, value in samples.model_inputs().items()}
    with runtime.autocast(), eval_mode(policy):
        logps, ref_logps = runtime.logprobs(policy, inputs), runtime.reference_logprobs(reference, inputs)
    k1, k3 = kl_estimates(logps, ref_logps)                     # per sample, float64
    ties = (scores == reference_judge_scores).float()
    wins = (scores > reference_judge_scores).float() + 0.5 * ties
    return {"eval/judge_reward": scores.mean().item(), "eval/judge_reward_std": scores.std().item(),
            "eval/reference_judge_reward": reference_judge_scores.mean().item(),
            "eval/reference_judge_reward_std": reference_judge_scores.std().item(),
            "eval/win_rate": wins.mean().item(),
            "eval/ties": ties.mean().item(),                      # share of prompts whose two samples tie
            "eval/kl": k1.float().mean().item(),                  # k1 mean: unbiased, can be < 0 (fp32 sum)
            "eval/kl_std": k1.float().std().item(),               # its standard deviation over the prompts
            "eval/kl_se": standard_error(k1),                     # its standard error (None for 1 prompt)
            "eval/kl_k3": k3.mean().item(),                       # k3 mean: unbiased, >= 0
            "eval/kl_k3_se": standard_error(k3),                  # its standard error (None for 1 prompt)
            "eval/response_length": samples.lengths.float().mean().item(),
            "eval/contains_eos": samples.contains_eos.float().mean().item()}


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
def train(config: SAILConfig, policy, tokenizer, task: Task, resume: bool = False,
          accelerator: Accelerator | None = None, progress: bool = True, overwrite: bool = False) -> list[dict]:
    """Train ``policy`` in place with the SAIL surrogate; return the metrics of every step.

    The reference policy is a frozen copy of ``policy`` as passed in (or, for a PEFT model,
    the same weights with adapters disabled). With ``resume=True`` the run continues from
    ``output_dir/checkpoint.pt`` and ends with the same metrics as an uninterrupted run; the
    checkpoint must be of this run's settings, training data and starting weights (the judge may
    change). An ``output_dir`` that holds a run is refused (``OutputExistsError``) unless
    ``resume=True`` or ``overwrite=True`` (its run files are then removed first).

    How a run ends early: a judge that raises, breaks its contract or exceeds ``judge_timeout_s`` raises
    ``JudgeError`` (one line: the judge, the step, the problem), on every process (the others raise
    ``runtime.ProcessFailed`` with that line); Ctrl-C raises ``KeyboardInterrupt``. Either way the last
    checkpoint is kept as it was, ready for ``resume=True``, and metrics.jsonl has a line per step done.
    """
    runtime, out = Runtime(config, accelerator), Path(config.output_dir)
    check_output(out, resume, overwrite)
    check_task(task, config, runtime)
    check_positions(policy, config.max_prompt_tokens, config.max_new_tokens)
    if runtime.is_main:
        clear_output(out, overwrite)
    if not runtime.alone:
        runtime.accelerator.wait_for_everyone()                           # every process checked before any writes
    fingerprint = run_fingerprint(task, policy)                          # before any step changes the weights
    judge = CheckedJudge(task.judge, config.judge_timeout_s)              # the contract, at every call
    task = dataclasses.replace(task, judge=judge)
    policy.to(runtime.device).train()
    reference = ReferenceModel(policy)                                   # pi_ref = the policy as it starts
    optimizer = make_optimizer(config, policy)
    start, counters = resume_from(out / "checkpoint.pt", policy, optimizer, runtime, fingerprint) if resume else (0, {})
    policy, optimizer = runtime.prepare(policy, optimizer, reference)   # checkpointing; DDP / FSDP2
    history = open_metrics(out, config, start, resume) if runtime.is_main else []
    compiled_before = compile_stats()                                    # the run's compilations, from here
    sampler = runtime.sampler(tokenizer, rows=2 * config.pairs_per_step)            # training samples: y1, y2
    eval_sampler = runtime.sampler(tokenizer, rows=min(config.eval_prompts, len(task.eval_prompts)))
    judge.where = "on the reference's samples (before step 0)"
    with runtime.together():
        reference_judge_scores = reference_scores(reference, tokenizer, task, runtime)
    judge_truncated_before = getattr(task.judge, "truncated", 0)        # judge inputs cut to its length
    gc.collect()       # set-up's new objects (models, data) would trigger a full collection (~0.25 s) in an early step
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"train {out}",
               disable=not (progress and runtime.is_main))
    for step in bar:
        manual_seed(step_seed(config.seed, step, runtime.rank, "dropout"), runtime.device)   # dropout masks, if any
        new_round = step % config.reuse_steps == 0 or step == start                  # iterative rounds: reuse_steps
        evaluating = (step + 1) % config.eval_every == 0 or step + 1 == config.steps
        judge.where = f"at step {step}"
        t0 = time.perf_counter()
        # ---------------------------------- ALGORITHM ----------------------------------
        if new_round:                                                                                 # 1. draw
            pairs = draw_pairs(policy, sampler, task, config, step, runtime.rank, runtime.processes)
        t1 = time.perf_counter()
        logps = score_pairs(policy, reference, pairs, runtime)                                        # 2. score
        t2 = time.perf_counter()
        if new_round:                                                                                 # 3. label
            with runtime.together():                          # a judge failure on one process ends all
                labels, judge_queries = label_pairs(pairs, logps, task, config, torch.Generator().manual_seed(
                    step_seed(config.seed, step, runtime.rank, "labels")))
            old_logps = PairLogps(*(t.detach() for t in vars(logps).values()))  # pi_old: the round's label step
        t3 = time.perf_counter()
        loss = pair_loss(logps, labels, pairs.routes, config, old_logps if config.reuse_steps > 1 else None)  # 4.
        term_norms = term_gradient_norms(loss, policy, pairs.routes, config) if evaluating and runtime.alone else {}
        optimizer.zero_grad(set_to_none=True)                                                         # 5. step
        stepped = runtime.step(loss.loss, policy, optimizer)  # backward, clip, step; skipped on all if not finite
        t4 = time.perf_counter()
        # -------------------------------- BOOKKEEPING ----------------------------------
        grad_norm = stepped.grad_norm if stepped.taken else None
        counters = update_counters(counters, pairs, judge_queries, new_round, not stepped.taken)
        skipped = {} if stepped.taken else explain_skipped_step(    # what was not finite; inputs saved
            out / "skipped" / f"step_{step:06d}.pt", pairs, logps, labels, loss, policy, config, step, counters)
        seconds = {"generate": t1 - t0, "label": t3 - t2, "train": (t2 - t1) + (t4 - t3)}
        record = step_record(step, loss, pairs, config, seconds, counters, compiled_before, grad_norm, skipped,
                             term_norms, getattr(task.judge, "truncated", 0) - judge_truncated_before)
        checkpointing = (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0) or step + 1 == config.steps
        with runtime.together():           # an error on one process (judge, disk) ends all: none waits forever
            if evaluating and runtime.evaluates:                     # sharded: every process takes part
                judge.where = f"at step {step}'s evaluation"
                t5 = time.perf_counter()
                record |= evaluate(policy, reference, eval_sampler, task, runtime, reference_judge_scores)
                record |= {"time/evaluate": time.perf_counter() - t5} | compilations_since(compiled_before)
                bar.set_postfix(reward=f"{record['eval/judge_reward']:.3f}", kl=f"{record['eval/kl']:.2f}")
            if runtime.is_main:
                history.append(record)
                append_metrics(out, record, runtime.accelerator)
            if checkpointing:
                runtime.save_checkpoint(out / "checkpoint.pt", policy, optimizer, next_step=step + 1,
                                        counters=counters, fingerprint=fingerprint)
    runtime.finish(policy)                                               # every process ends with the same weights
    return history


# --------------------------------------------------------------------------------------
# a skipped step, replayed
# --------------------------------------------------------------------------------------
def replay_skipped_step(path: str | Path, policy, **overrides) -> dict:
    """Recompute a skipped step from its saved inputs on ``policy`` (built as for the run: the same
    base model, LoRA included), with the trainable weights as they were; return what is non-finite.
    ``overrides`` change the run's settings for the replay, one suspect at a time, e.g.
    ``cudnn_attention=True`` (PyTorch's cuDNN attention kernel), ``mixed_precision="no"`` (fp32).

        from sail_min.train import replay_skipped_step
        print(replay_skipped_step("outputs/run/skipped/step_000012.pt", policy))
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = SAILConfig.from_dict({**state["config"], **overrides})
    reference = ReferenceModel(policy)                 # a PEFT policy: its base; else the weights as loaded
    policy.load_state_dict(state["trainable"], strict=False)
    policy.train()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    runtime = Runtime(config)
    logps = score_inputs(policy, reference, state["inputs"], len(state["routes"]), runtime)
    loss = pair_loss(logps, PairLabels(state["first_is_chosen"]), state["routes"], config)
    policy.zero_grad(set_to_none=True)
    if torch.isfinite(loss.loss):
        with attention_kernels(config.cudnn_attention):
            loss.loss.backward()
    return {"loss": loss.loss.item(),
            "nonfinite_logp_rows": {k: (~torch.isfinite(v.detach())).nonzero().flatten().tolist()
                                    for k, v in vars(logps).items()},
            "nonfinite_grads": [name for name, p in policy.named_parameters()
                                if p.grad is not None and not bool(torch.isfinite(p.grad).all())]}


# --------------------------------------------------------------------------------------
# bookkeeping
# --------------------------------------------------------------------------------------
COUNTERS = ("skipped_steps", "truncated_prompts", "truncated_responses", "judge_queries")


def update_counters(counters: dict, pairs: StepPairs, judge_queries: int, new_round: bool, skipped: bool) -> dict:
    """The run's running totals (checkpointed; a resumed run goes on counting)."""
    counters = {name: counters.get(name, 0) for name in COUNTERS}
    counters["skipped_steps"] += int(skipped)
    if new_round:                                         # a round's pairs and labels are counted once
        counters["truncated_prompts"] += pairs.truncated_prompts
        counters["truncated_responses"] += pairs.truncated_responses
        counters["judge_queries"] += judge_queries
    return counters


def resume_from(path: Path, policy, optimizer, runtime: Runtime, fingerprint: dict | None = None) -> tuple[int, dict]:
    """(next step, counters) of the checkpoint at ``path``, its weights and optimiser state loaded; (0, {})
    when there is none yet. Read onto the CPU whatever the run's device (``load_checkpoint``)."""
    if not path.exists():
        return 0, {}
    if runtime.sharded:
        raise NotImplementedError("resuming a sharded (FSDP2) run is not implemented: its checkpoint "
                                  "holds the gathered trainable weights, load them into the model to start over")
    state = load_checkpoint(path)
    return restore(state, policy, optimizer, runtime.scaler, config=runtime.config.to_dict(), path=path,
                   fingerprint=fingerprint)


RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.json")
"""The files that make a folder hold a run: a new run never writes over them unasked."""


class OutputExistsError(FileExistsError):
    """``output_dir`` holds an earlier run and the new one was asked neither to resume nor to overwrite it."""


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an ``output_dir`` that is a file, or that holds a run when neither ``resume`` nor ``overwrite``."""
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True contradict each other: resume continues the run in "
                         "output_dir, overwrite replaces it")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: is a file, not a folder; choose a folder for the run's outputs (output_dir)")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not resume and not overwrite:
        raise OutputExistsError(f"{out} holds a run ({', '.join(held)}); continue it with --resume (resume=True), "
                                f"replace it with --overwrite (overwrite=True), or choose another output folder")


def clear_output(out: Path, overwrite: bool) -> None:
    """Process 0, before the run writes: with ``overwrite`` the earlier run's files go; a checkpoint save that was
    killed (SIGKILL) left a temporary file: it goes too, with a warning that says so."""
    import shutil
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "skipped", ignore_errors=True)
    stray = remove_stray_temporaries(out / "checkpoint.pt")
    if stray:
        warnings.warn(f"removed {len(stray)} temporary file(s) of a checkpoint save that was killed: "
                      f"{', '.join(str(p) for p in stray)}; the checkpoint itself was not touched", RuntimeWarning)


def run_fingerprint(task: Task, policy) -> dict:
    """Digests of what a checkpoint must resume with: the training data (preferences, training and evaluation
    prompts, in order) and the model's weights as passed in (per tensor: name, shape, dtype and sums, to 10
    significant digits, so round-off of another device's reduction does not count). The judge is not in it."""
    data = hashlib.sha256()
    for part in (task.preferences, task.train_prompts, task.eval_prompts):
        data.update(b"|")
        for row in part:
            data.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\n")
    named = [(name, p.detach()) for name, p in policy.named_parameters()]
    with torch.no_grad():
        sums = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for _, p in named]).tolist() \
            if named else []
    weights = hashlib.sha256("".join(f"{name}{tuple(p.shape)}{p.dtype}{a:.10g}{b:.10g};" for (name, p), (a, b)
                                     in zip(named, sums)).encode())
    return {"data": data.hexdigest(), "weights": weights.hexdigest()}


def check_task(task: Task, config: SAILConfig, runtime: Runtime) -> None:
    if config.route_dpo + config.route_dp > 0 and len(task.preferences) == 0:
        raise ValueError("the config routes pairs to the dataset, but task.preferences is empty")
    if config.route_pp + config.route_pr > 0 and len(task.train_prompts) == 0:
        raise ValueError("the config samples online pairs, but task.train_prompts is empty")
    if len(task.eval_prompts) == 0:
        raise ValueError("task.eval_prompts is empty: evaluation needs held-out prompts")

