"""sail_min against TRL on the same work, by CPU time per optimiser step (CPU, fp32, one thread).

Four workloads, each trained by both sides with the same model, data, pairs per step, learning rate,
beta, gradient clipping, sampling temperature (1) and new-token limit; nothing is downloaded:

    offline-tiny        DPO on data/tiny/preferences.jsonl, data/tiny/policy, 8 pairs per step
                        (TRL: DPOTrainer; sail_min: the offline-dpo preset)
    offline-sentiment   DPO on data/sentiment/preferences.jsonl, data/sentiment/base, 16 pairs per step
    online-tiny         online DPO on data/tiny/prompts.jsonl, data/tiny/policy, 8 prompts per step,
                        2 samples each, labelled by the reward model data/tiny/reward
                        (TRL: experimental OnlineDPOTrainer; sail_min: the online-dpo preset with
                        RewardModelScorer)
    online-sentiment    the same on data/sentiment/train_prompts.jsonl, data/sentiment/base, 16 prompts

What is timed: the process's CPU time (``time.process_time``) between consecutive optimiser steps
(a global optimizer post-step hook: the same clock on both sides, nothing patched inside either
trainer), after ``--warmup`` steps, over ``--steps`` steps: everything one step costs, bookkeeping and
logging included, at each side's defaults (TRL logs every 10 steps, sail_min writes a metrics line every
step). Set-up, the reference's samples and evaluation fall outside (evaluation runs after the last step).
Each measurement is a fresh process (``--one``); ``--repeats`` rounds run every (workload, side) once,
alternating which side goes first, round r with seed r on both sides (sampling, data order), so that each round
is another draw of the responses: a step's cost follows its longest response (the decoding steps). The table gives, per workload, the median CPU seconds per step of
each side and TRL / sail_min as the median of the per-round ratios (> 1: sail_min is faster), with their
range. Responses are samples, so the two sides generate different texts of the same length
distribution; ``tokens (decode steps)`` gives each side's mean response length and mean decoding steps per
sampling call, to show that the work matched.

    pip install trl            # the benchmark's dependency alone, not sail_min's
    python benchmarks/bench_trl.py                         # 4 workloads x 2 sides x 5 rounds, ~10 min
    python benchmarks/bench_trl.py --workloads online-tiny --repeats 3 --steps 20
    python benchmarks/bench_trl.py --one online-tiny --side sail_min       # one measurement, as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))          # this checkout's sail_min, here and in every measured process (same file)
REWARD_MODEL = ROOT / "data/tiny/reward"


@dataclass(frozen=True)
class Workload:
    policy: str            # model folder under the repository
    data: str              # preference pairs (offline) or prompts (online)
    online: bool
    pairs: int             # pairs (offline) or prompts, two samples each (online), per optimiser step


WORKLOADS = {
    "offline-tiny": Workload("data/tiny/policy", "data/tiny/preferences.jsonl", False, 8),
    "offline-sentiment": Workload("data/sentiment/base", "data/sentiment/preferences.jsonl", False, 16),
    "online-tiny": Workload("data/tiny/policy", "data/tiny/prompts.jsonl", True, 8),
    "online-sentiment": Workload("data/sentiment/base", "data/sentiment/train_prompts.jsonl", True, 16),
}
SIDES = ("trl", "sail_min")
LR, BETA, MAX_GRAD_NORM, MAX_NEW_TOKENS = 1e-6, 0.1, 1.0, 24


class StepClock:
    """CPU time at the end of every optimiser step, from a global post-step hook (any optimizer), and the
    length of every sampled response (up to its first EOS, or all new tokens), tagged with the step it was
    drawn in. Instrumentation only: both sides call the same ``generate``."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from transformers.generation.utils import GenerationMixin
        self.times: list[float] = []
        self.responses: list[tuple[int, float, int, int]] = []   # (steps done when sampled, mean new tokens,
        #                                                             decode steps, rows sampled)
        register_optimizer_step_post_hook(lambda optimizer, args, kwargs: self.times.append(time.process_time()))
        generate, clock = GenerationMixin.generate, self

        def counted_generate(model, *args, **kwargs):
            import torch
            sequences = generate(model, *args, **kwargs)
            inputs = kwargs.get("input_ids", args[0] if args else None)
            new = sequences[:, inputs.shape[1]:]
            eos = model.generation_config.eos_token_id
            is_eos = torch.isin(new, torch.tensor(eos if isinstance(eos, list) else [eos]))
            ended = is_eos.any(dim=1)
            lengths = torch.where(ended, is_eos.int().argmax(dim=1) + 1, new.shape[1])
            clock.responses.append((len(clock.times), lengths.float().mean().item(), new.shape[1], new.shape[0]))
            return sequences

        GenerationMixin.generate = counted_generate

    def per_step(self, warmup: int) -> tuple[float, int, float, float, float]:
        """Mean CPU seconds per step over the steps after the first ``warmup``, how many, and of the sampling in
        them (0 offline): the mean response length, the mean decoding steps per call (its longest response) and
        the mean rows per call (prompts x samples: the work of a step)."""
        measured = self.times[warmup:]
        steps = len(measured) - 1
        sampled = [(mean, width, rows) for done, mean, width, rows in self.responses if warmup < done <= warmup + steps]
        means = [statistics.fmean(column) if column else 0.0 for column in zip(*sampled)] or [0.0, 0.0, 0.0]
        return (measured[-1] - measured[0]) / steps, steps, *means


def load(workload: Workload, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_pretrained(ROOT / workload.policy, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / workload.policy)
    reward = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL, dtype=torch.float32)
    reward_tokenizer = AutoTokenizer.from_pretrained(REWARD_MODEL)
    for tok in (tokenizer, reward_tokenizer):
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    reward.config.pad_token_id = reward_tokenizer.pad_token_id
    rows = [json.loads(line) for line in (ROOT / workload.data).read_text().splitlines() if line.strip()]
    return policy, tokenizer, reward, reward_tokenizer, rows


def run_trl(workload: Workload, steps: int, out: str, seed: int) -> None:
    """Train with TRL's trainer for the workload."""
    from datasets import Dataset
    policy, tokenizer, reward, reward_tokenizer, rows = load(workload, seed)
    common = dict(output_dir=out, per_device_train_batch_size=workload.pairs, max_steps=steps, learning_rate=LR,
                  beta=BETA, max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="constant", optim="adamw_torch",
                  gradient_checkpointing=False, bf16=False, use_cpu=True, save_strategy="no", report_to="none",
                  seed=seed, dataloader_num_workers=0, disable_tqdm=True,
                  dataloader_drop_last=True)   # every step a full batch, as sail_min's: 20 rows at 8 per step are
                                               # otherwise 8, 8, 4 per epoch, a third of TRL's steps at half the work
    if workload.online:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
        args = OnlineDPOConfig(**common, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, max_length=4096)
        trainer = OnlineDPOTrainer(model=policy, reward_funcs=reward, args=args,
                                   train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in rows]),
                                   processing_class=tokenizer, reward_processing_classes=reward_tokenizer)
    else:
        from trl import DPOConfig, DPOTrainer
        args = DPOConfig(**common, max_length=None)
        trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    trainer.train()


def run_sail_min(workload: Workload, steps: int, out: str, seed: int) -> None:
    """Train with sail_min.train()."""
    from sail_min.config import SAILConfig
    from sail_min.labels import RewardModelScorer
    from sail_min.train import Task, train
    policy, tokenizer, reward, reward_tokenizer, rows = load(workload, seed)
    config = SAILConfig.preset("online-dpo" if workload.online else "offline-dpo", pairs_per_step=workload.pairs,
                        steps=steps, lr=LR, beta=BETA, max_grad_norm=MAX_GRAD_NORM, max_new_tokens=MAX_NEW_TOKENS,
                        temperature=1.0, prompt_format="text", eval_every=steps, eval_prompts=2, checkpoint_every=0,
                        seed=seed, output_dir=out)
    prompts = [row["prompt"] for row in rows]
    task = Task(preferences=[] if workload.online else rows, train_prompts=prompts, eval_prompts=prompts[:2],
                judge=RewardModelScorer(reward, reward_tokenizer))
    train(config, policy, tokenizer, task, progress=False)


def measure(name: str, side: str, steps: int, warmup: int, seed: int) -> dict:
    import torch
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        (run_trl if side == "trl" else run_sail_min)(WORKLOADS[name], warmup + steps, out, seed)
    seconds, counted, tokens, decode_steps, rows = clock.per_step(warmup)
    return {"workload": name, "side": side, "seed": seed, "cpu_s_per_step": seconds, "steps": counted,
            "tokens": tokens, "decode_steps": decode_steps, "rows": rows}


def run_fresh(name: str, side: str, steps: int, warmup: int, seed: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, __file__, "--one", name, "--side", side, "--steps", str(steps),
                           "--warmup", str(warmup), "--seed", str(seed)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{side} on {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict], names: list[str]) -> str:
    """Per workload: median CPU s/step of each side; TRL / sail_min as the median of the per-round ratios (the
    two sides of a round run back to back, so a machine that slows for a while slows both) and their range; the
    paired difference TRL - sail_min in ms/step with its SE and the project's verdict (``lab.findings``, |d| >= 3
    SE: "above" = sail_min faster); each side's rows per sampling call (one call per step), their mean response
    length and the call's decoding steps."""
    from sail_min.lab.findings import THRESHOLD_SE, paired
    lines = ["| workload | TRL s/step | sail_min s/step | TRL / sail_min | per-round range | TRL - sail_min, ms/step "
             f"(verdict at {THRESHOLD_SE:g} SE) | rows x tokens (decode steps) TRL / sail_min | rounds |",
             "|---|---|---|---|---|---|---|---|"]
    for name in names:
        by_side = [{r["seed"]: r for r in results if r["workload"] == name and r["side"] == side} for side in SIDES]
        both = sorted(by_side[0].keys() & by_side[1].keys())                       # paired by round (seed)
        unpaired = sorted(by_side[0].keys() ^ by_side[1].keys())
        if unpaired:                # an interrupted run: a round measured on one side only is left out, and named
            print(f"{name}: round(s) {unpaired} measured on one side only, left out", file=sys.stderr)
        if not both:
            continue
        trl, ours = ([side[seed] for seed in both] for side in by_side)
        trl_s, our_s = ([r["cpu_s_per_step"] for r in rs] for rs in (trl, ours))
        rounds = [a / b for a, b in zip(trl_s, our_s)]
        if len(rounds) > 1:
            difference = paired([1000 * a for a in trl_s], [1000 * b for b in our_s])
            verdict = (f"{difference.difference:+.1f} ± {difference.standard_error:.1f} (SE, n={difference.n}): "
                       f"{difference.verdict}")
        else:                                                    # one round: no SE, so no verdict
            verdict = f"{1000 * (trl_s[0] - our_s[0]):+.1f} (n=1): no verdict from one round"
        tokens = " / ".join(f"{statistics.fmean(r['rows'] for r in rs):.1f} x {statistics.fmean(r['tokens'] for r in rs):.1f} "
                            f"({statistics.fmean(r['decode_steps'] for r in rs):.1f})"
                            for rs in (trl, ours)) if WORKLOADS[name].online else "-"
        lines.append(f"| {name} | {statistics.median(trl_s):.4f} | {statistics.median(our_s):.4f} | "
                     f"**{statistics.median(rounds):.2f}** | {min(rounds):.2f}-{max(rounds):.2f} | "
                     f"{verdict} | {tokens} | {len(rounds)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5, help="rounds of fresh processes per (workload, side)")
    parser.add_argument("--first-round", type=int, default=0, help="index (and seed) of the first round, to add rounds")
    parser.add_argument("--steps", type=int, default=30, help="timed optimiser steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    parser.add_argument("--out", help="write every measurement as JSON here")
    parser.add_argument("--table", nargs="+", help="print the table of the measurements saved with --out (one or "
                        "more files, e.g. runs with other --first-round), and nothing else")
    parser.add_argument("--one", choices=list(WORKLOADS), help="one measurement in this process, printed as JSON")
    parser.add_argument("--side", choices=SIDES, default="sail_min")
    parser.add_argument("--seed", type=int, default=0, help="--one: the seed of both sides' runs (a round's is its index)")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.side, args.steps, args.warmup, args.seed)))
        return
    if args.table:
        results = [r for path in args.table for r in json.loads(Path(path).read_text())]
        print(table(results, [name for name in WORKLOADS if any(r["workload"] == name for r in results)]))
        return
    import transformers
    import trl
    import torch
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{args.repeats} rounds x {args.steps} steps after {args.warmup}; CPU, fp32, 1 thread", flush=True)
    results = []
    for round_ in range(args.first_round, args.first_round + args.repeats):
        for name in args.workloads:
            for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                results.append(run_fresh(name, side, args.steps, args.warmup, seed=round_))
                r = results[-1]
                print(f"round {round_}: {name:17s} {side:8s} {r['cpu_s_per_step']:.4f} CPU s/step", flush=True)
                if args.out:                    # after every measurement: an interrupted run keeps what it measured
                    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results, args.workloads))


if __name__ == "__main__":
    main()
