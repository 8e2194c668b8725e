"""Command line: `python -m sail_min [bandit|check] [--out DIR]`.

  (no command)  the main job: for now the bandit comparison (offline DPO, online DPO,
                SAIL-PR/PP/DP, public-code mode, response-term sweep), table + PNG + JSON
  bandit        the same bandit comparison, explicitly
  check         verify the derivation numerically; exits 1 if the max relative error > 1e-8
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sail_min", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="bandit", choices=["bandit", "check"])
    parser.add_argument("--out", default="outputs", help="folder for results (default: outputs)")
    parser.add_argument("--seeds", type=int, default=5, help="runs per method (bandit, default 5)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (bandit, default 1000)")
    args = parser.parse_args(argv)

    if args.command == "check":
        from .check import main as check_main
        return check_main()

    if args.seeds < 1 or args.steps < 1:
        parser.error(f"--seeds and --steps must be >= 1, got {args.seeds} and {args.steps}")
    import torch

    from .experiments import BanditSetup, format_table, run_bandit_comparison, write_results

    torch.set_num_threads(1)  # tensors of a few hundred numbers: extra threads only add overhead

    start = time.perf_counter()
    setup = BanditSetup(n_seeds=args.seeds, steps=args.steps)
    results = run_bandit_comparison(setup, progress=lambda name: print(f"  trained {name}", flush=True))
    print(format_table(results))
    json_path, png_path = write_results(results, args.out)
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
