"""Command line: `python -m sail_min [compare|train|bandit|check] ...`.

  (no command)  the main job = `compare`: offline DPO, online DPO, SAIL-PR, SAIL-PP, SAIL-DP on the
                sentiment toy task (tiny local model, VADER judge), several seeds; table,
                results.json, per-step metrics and PNG plots in --out (`--quick` for CI)
  train         one run: your model, data and judge (--model, --data, --judge), or without --model
                the toy task; `accelerate launch -m sail_min train ...` for several processes;
                `--resume` continues from the run's last checkpoint (`train --help` for the options)
  bandit        the exactly solvable bandit comparison (notebook 02; --full: the committed results/bandit/)
  fixed-points  the bandit's exact fixed points of each variant's flow (notebook 02)
  check         verify the derivation numerically; exits 1 if the max relative error > 1e-8
"""
from __future__ import annotations

import argparse
import sys
import time

from .config import PRESETS, SAILConfig

DEFAULT_PRESET = next(name for name, fields in PRESETS.items() if not fields)   # the one that is SAILConfig()


def _compare(args) -> int:
    from .checkpoint import CheckpointError
    from .cli import UserError
    from .lab.compare import IncompleteRun, write_results
    from .lab.experiments import main_job, report
    from .lab.sentiment import REWARD_LABEL
    from .train import OutputExistsError

    start = time.perf_counter()
    if args.full:
        return _compare_full(args, start)
    try:
        results = main_job(args.out, seeds=args.seeds or (2 if args.quick else 5), quick=args.quick,
                           resume=args.resume, progress=not args.quick, overwrite=args.overwrite)
    except (CheckpointError, IncompleteRun, OutputExistsError) as error:   # a folder that does not fit
        raise UserError(str(error)) from None
    print(report(results))
    paths = write_results(results, args.out, REWARD_LABEL)
    print(f"wrote {', '.join(map(str, paths))} and per-run metrics.jsonl under {args.out} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


def _compare_full(args, start: float) -> int:
    """--full: every method at 3 learning rates (each reported at its best), at 3 betas (the frontier) and
    offline vs online DPO at 4 judge budgets; writes results_full.json and frontier.png."""
    import json
    from pathlib import Path

    from .lab.compare import plot_frontier
    from .lab.experiments import full_job, full_report
    from .lab.sentiment import REWARD_LABEL

    results = full_job(args.out, seeds=args.seeds or 5, progress=False, overwrite=args.overwrite)
    print(full_report(results))
    full_path = Path(args.out) / "results_full.json"
    full_path.write_text(json.dumps(results, indent=1))
    frontier = plot_frontier(results["by_beta"], REWARD_LABEL, Path(args.out) / "frontier.png")
    print(f"wrote {full_path}, {frontier} in {time.perf_counter() - start:.0f} s")
    return 0


def _train(args) -> int:
    from .cli import run_train
    from .lab import sentiment                     # the toy task: imports neither vaderSentiment nor a model yet

    def toy_run():
        policy, tokenizer = sentiment.load_base_model()
        return policy, tokenizer, sentiment.sentiment_task()

    return run_train(args, toy_run=toy_run, named_judges={"vader": sentiment.VaderJudge})


def _bandit(args) -> int:
    import torch

    from .lab.bandit_comparison import BanditSetup, run_bandit_comparison, write_results

    torch.set_num_threads(1)  # tensors of a few hundred numbers: extra threads only add overhead
    start = time.perf_counter()
    changes = {k: v for k, v in (("n_seeds", args.seeds), ("steps", args.steps)) if v is not None}
    if args.budgets:
        changes["budgets"] = tuple(args.budgets)
        changes.setdefault("headline_budget", args.budgets[-1])
    results = run_bandit_comparison(BanditSetup.full(**changes) if args.full else BanditSetup(**changes))
    json_path, png_path = write_results(results, args.out)
    print((json_path.parent / "bandit_table.txt").read_text())      # summary_text of the numbers as stored
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - start:.1f} s")
    return 0


def _fixed_points(args) -> int:
    import json
    from pathlib import Path

    import torch

    from .lab.bandit_comparison import BanditSetup
    from .lab.fixed_points import run_part

    torch.set_num_threads(1)
    setup, path = BanditSetup.full(), Path(args.out) / "fixed_points.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        start = time.perf_counter()
        result = run_part(part, setup)
        merged = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**merged, **result}))
        print(f"{part}: merged into {path} in {time.perf_counter() - start:.0f} s")
    return 0


TRAIN_HELP = """One training run with sail_min.train.train, as in the notebooks: writes config.json,
metrics.jsonl (one line per step) and checkpoint.pt to --out.

  your own:  python -m sail_min train --model Qwen/Qwen2.5-0.5B-Instruct --lora-rank 16 \\
                 --data trl-lib/ultrafeedback_binarized --judge Skywork/Skywork-Reward-V2-Qwen3-0.6B \\
                 --preset sail-pr --set lr=5e-5 --set max_new_tokens=128 --set mixed_precision=bf16
  toy task:  python -m sail_min train --preset sail-pr   (no --model: tiny policy, toy data, VADER judge)

The run's settings (a SAILConfig), later sources winning:
  SAILConfig defaults < --config FILE.json < --preset < --set FIELD=VALUE (in order) < --steps, --seed, --out
--preset over --config replaces the config's routes and coefficients; without --preset and --config the run takes
SAILConfig's defaults (offline DPO).
Mistakes in arguments or files end with one line `error: ...` on stderr and exit status 2; so does a run that
ends early (its judge fails, a disk refuses a write, Ctrl-C), with the last checkpoint kept and the command that
goes on from it. A --out that holds a run is refused unless --resume (continue it) or --overwrite (replace it)."""


def _add_train_parser(commands) -> None:
    one = commands.add_parser("train", help="one run: your model, data and judge, or the toy task",
                              description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = one.add_argument_group("what to train")
    what.add_argument("--model", metavar="NAME_OR_PATH",
                      help="policy: a causal LM folder or hub name (also pi_ref); without it, the toy task")
    what.add_argument("--lora-rank", type=int, metavar="R",
                      help="train LoRA adapters of rank R (alpha 2R, all linear layers) instead of all weights")
    what.add_argument("--preset", choices=sorted(PRESETS),
                      help="the method: its routes and coefficients (default: --config's, else SAILConfig's: "
                           f"{DEFAULT_PRESET})")
    what.add_argument("--config", metavar="FILE.json",
                      help="start from a run's config.json (or any JSON object of SAILConfig fields)")
    what.add_argument("--set", action="append", metavar="FIELD=VALUE",
                      help="set a SAILConfig field, e.g. lr=5e-5, max_new_tokens=128 (repeatable); "
                           "multiple-choice fields: " + "; ".join(f"{k} {'|'.join(v)}" for k, v in
                                                                  SAILConfig.choices().items()))
    data = one.add_argument_group("data")
    data.add_argument("--data", metavar="FILE_OR_HUB_NAME",
                      help="preference pairs (prompt, chosen, rejected): .json/.jsonl/.parquet or a hub "
                           "dataset; their prompts are also the online prompts")
    data.add_argument("--split", default="train", metavar="NAME", help="split of a hub --data (default: train)")
    data.add_argument("--eval-data", metavar="FILE_OR_HUB_NAME",
                      help="held-out prompts for evaluation (default: the last eval_prompts rows of --data, at most a fifth, "
                           "removed from training)")
    data.add_argument("--eval-split", default="train", metavar="NAME", help="split of a hub --eval-data (default: train)")
    judge = one.add_argument_group("judge")
    judge.add_argument("--judge", metavar="NAME_OR_PATH|vader|module:function",
                       help="who scores responses: a reward-model folder or hub name (read with its own "
                            "tokenizer), vader (the toy sentiment judge), or a callable "
                            "(prompts, responses) -> scores imported from module:function")
    run = one.add_argument_group("run")
    defaults = SAILConfig()
    run.add_argument("--steps", type=int, default=None, metavar="N",
                     help=f"optimiser steps (default: the config's, else SAILConfig's: {defaults.steps})")
    run.add_argument("--seed", type=int, default=None, metavar="N",
                     help=f"seed of every random choice (default: the config's, else SAILConfig's: {defaults.seed})")
    run.add_argument("--out", default=None, metavar="DIR",
                     help=f"output folder: config.json, metrics.jsonl, checkpoint.pt (with --resume: --config's "
                          f"output_dir; a new run from a --config that names another output_dir needs --out; "
                          f"default: SAILConfig's: {defaults.output_dir})")
    run.add_argument("--resume", action="store_true",
                     help="continue from the checkpoint in --out (same settings, data and model; --steps may grow)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in --out (its checkpoint, metrics and config); without it a folder that "
                          "holds a run is refused")
    run.add_argument("--threads", type=int, default=1, metavar="N", help="torch CPU threads per process (default 1)")
    logging = one.add_argument_group("logging")
    logging.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default="none",
                         help="also log every step's numbers through accelerate's trackers (tensorboard "
                              "writes under --out/sail_min; needs the package installed)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sail_min", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")

    compare = commands.add_parser("compare", help="the main job (default)")
    compare.add_argument("--out", default="outputs/compare", help="output folder (default: outputs/compare)")
    compare.add_argument("--quick", action="store_true", help="a CI-sized run: fewer steps, seeds, prompts")
    compare.add_argument("--seeds", type=int, default=None, help="runs per method (default 5, quick 2)")
    compare.add_argument("--resume", action="store_true", help="continue the runs found in --out")
    compare.add_argument("--overwrite", action="store_true",
                         help="train again the runs found in --out (without it, or --resume, they are refused)")
    compare.add_argument("--full", action="store_true",
                         help="the full sweep: 3 learning rates (each method at its best) and 3 betas (frontier)")

    _add_train_parser(commands)

    bandit = commands.add_parser("bandit", help="the bandit comparison (notebook 02)")
    bandit.add_argument("--out", default="outputs/bandit", help="output folder (default: outputs/bandit)")
    bandit.add_argument("--seeds", type=int, default=None, help="runs per method (default 5)")
    bandit.add_argument("--steps", type=int, default=None, help="optimiser steps, every method and budget (default 500)")
    bandit.add_argument("--budgets", type=int, nargs="+", metavar="N",
                        help="oracle labels per prompt to compare at (default 1024)")
    bandit.add_argument("--full", action="store_true",
                        help="the committed sweep: budgets 16..4096, 20 runs per method, 100 at 1024 labels "
                             "(results/bandit/, ~40 min on 2 cores)")

    from .lab.fixed_points import PARTS
    fixed = commands.add_parser("fixed-points", help="the bandit's exact fixed points (notebook 02)")
    fixed.add_argument("--out", default="outputs/bandit", help="output folder of fixed_points.json (default: outputs/bandit)")
    fixed.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                       help="compute these parts and merge them into OUT/fixed_points.json (default: all)")

    commands.add_parser("check", help="verify the derivation numerically")

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["compare", *argv]                             # bare `python -m sail_min [--quick ...]`
    args = parser.parse_args(argv)
    args.argv = argv                                          # the command, for the resume hint
    from .cli import UserError, report
    try:
        for name in ("seeds", "steps", "threads", "lora_rank"):
            value = getattr(args, name, None)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if args.command == "check":
            from .lab.check import main as check_main
            return check_main()
        return {"compare": _compare, "train": _train, "bandit": _bandit, "fixed-points": _fixed_points}[args.command](args)
    except UserError as error:            # the user's mistake: one line; anything else keeps its traceback
        return report(error)
    except KeyboardInterrupt:             # Ctrl-C outside a training loop (which says more: cli.run_train)
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
