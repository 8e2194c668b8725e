"""Command line: `python -m sail_min [compare|train|bandit|check] ...`.

  (no command)  the main job = `compare`: offline DPO, online DPO, SAIL-PR, SAIL-PP, SAIL-DP on the
                sentiment toy task (tiny local model, VADER judge), several seeds; table,
                results.json, per-step metrics and PNG plots in --out (`--quick` for CI)
  train         one run of a preset on the toy task (`accelerate launch -m sail_min train ...` for
                several processes); `--resume` continues from the run's last checkpoint
  bandit        the exactly solvable bandit comparison (notebook 02)
  check         verify the derivation numerically; exits 1 if the max relative error > 1e-8
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time


def _compare(args) -> int:
    from .compare import format_table, write_results
    from .tasks.sentiment import REWARD_LABEL, main_job

    start = time.perf_counter()
    results = main_job(args.out, seeds=args.seeds or (2 if args.quick else 5), quick=args.quick,
                       resume=args.resume, progress=not args.quick)
    print(format_table(results, labels_column="judge_queries", labels_title="judge queries"))
    paths = write_results(results, args.out, REWARD_LABEL)
    print(f"wrote {', '.join(map(str, paths))} and per-run metrics.jsonl under {args.out} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


def parse_set(items, fields: dict) -> dict:
    """--set FIELD=VALUE items as SAILConfig fields of the right type (a clear message otherwise)."""
    overrides = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with a SAILConfig field "
                             f"({', '.join(sorted(fields))})")
        kind = type(fields[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--set {item!r}: {key} takes true or false")
            overrides[key] = value.lower() in ("true", "1")
        else:
            try:
                overrides[key] = value if kind is str else kind(value)
            except ValueError:
                raise SystemExit(f"--set {item!r}: {key} takes a {kind.__name__}") from None
    return overrides


def _train(args) -> int:
    import torch

    from .config import SAILConfig
    from .tasks.sentiment import load_base_model, sentiment_task
    from .train import train

    torch.set_num_threads(args.threads)
    try:
        base = SAILConfig.from_json(args.config).to_dict() if args.config else {}
        overrides = {**base, **parse_set(args.set, SAILConfig().to_dict()),
                     **{k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("output_dir", args.out))
                        if v is not None}}
        config = SAILConfig.preset(args.preset, **overrides) if not args.config else SAILConfig.from_dict(overrides)
    except ValueError as error:                       # a bad value: the message names the field
        raise SystemExit(f"invalid configuration: {error}") from None
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    policy, tokenizer = load_base_model()
    history = train(config, policy, tokenizer, sentiment_task(), resume=args.resume, accelerator=accelerator)
    if accelerator.is_main_process:
        print(f"trained on {accelerator.num_processes} process(es), {config.pairs_per_step} pairs per step each")
    if history:
        last = [h for h in history if "eval/judge_reward" in h][-1]
        print(f"step {last['step'] + 1}: judge reward {last['eval/judge_reward']:.3f}, "
              f"win rate {last['eval/win_rate']:.3f}, KL {last['eval/kl']:.2f}")
    return 0


def _bandit(args) -> int:
    import torch

    from .bandit_comparison import BanditSetup, format_table, run_bandit_comparison, write_results

    torch.set_num_threads(1)  # tensors of a few hundred numbers: extra threads only add overhead
    start = time.perf_counter()
    changes = {k: v for k, v in (("n_seeds", args.seeds), ("steps", args.steps)) if v is not None}
    results = run_bandit_comparison(BanditSetup(**changes))
    print(format_table(results))
    json_path, png_path = write_results(results, args.out)
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sail_min", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")

    compare = commands.add_parser("compare", help="the main job (default)")
    compare.add_argument("--out", default="outputs/compare", help="output folder (default: outputs/compare)")
    compare.add_argument("--quick", action="store_true", help="a CI-sized run: fewer steps, seeds, prompts")
    compare.add_argument("--seeds", type=int, default=None, help="runs per method (default 5, quick 2)")
    compare.add_argument("--resume", action="store_true", help="continue the runs found in --out")

    one = commands.add_parser("train", help="one run of a preset on the toy task")
    one.add_argument("--preset", default="sail-pr", help="offline-dpo, online-dpo, sail-pr, sail-pp, sail-dp")
    one.add_argument("--config", help="a run's config.json (or any JSON object of SAILConfig fields)")
    one.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the config's, 42)")
    one.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    one.add_argument("--out", default="outputs/train", help="output folder (metrics, checkpoint)")
    one.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    one.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    one.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a SAILConfig field")

    bandit = commands.add_parser("bandit", help="the bandit comparison (notebook 02)")
    bandit.add_argument("--out", default="outputs/bandit", help="output folder (default: outputs/bandit)")
    bandit.add_argument("--seeds", type=int, default=None, help="runs per method (default 5)")
    bandit.add_argument("--steps", type=int, default=None, help="training steps (default 1000)")

    commands.add_parser("check", help="verify the derivation numerically")

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["compare", *argv]                             # bare `python -m sail_min [--quick ...]`
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.command == "check":
        from .check import main as check_main
        return check_main()
    return {"compare": _compare, "train": _train, "bandit": _bandit}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
