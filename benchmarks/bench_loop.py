"""The whole `sail_min.train()` loop at notebook 07's real shapes, with random weights.

Policy: Qwen2.5-0.5B-Instruct's shape (24 layers, hidden 896, 14 heads / 2 KV, MLP 4864, vocab
151,936, tied embeddings) in bf16 + LoRA r=16 on every linear layer, its base as the reference.
Judge: a Qwen3-0.6B-shaped sequence classifier (28 layers, hidden 1024, 16 heads / 8 KV, MLP 3072)
in bf16 through `RewardModelScorer`. Notebook 07's settings: 8 pairs per step, 128 new tokens,
max_prompt_tokens 256, bf16 autocast, gradient checkpointing, static KV cache; prompts of 20-200
tokens; 128 held-out prompts. Everything is built from configs (nothing is downloaded), with a
word-level tokenizer over the vocabulary; random weights rarely sample EOS, so responses run to
128 tokens: the worst case for time.

For each method (online DPO, SAIL-PR, SAIL-PP) and each variant (a set of SAILConfig overrides,
`--variant`), one `train()` run of `--steps` steps in this process prints:
  - steady-state seconds per step (median over steps after the first 3 that compiled nothing),
    split into generate / label / train, and seconds per evaluation;
  - torch.compile graphs built in the run and seconds spent compiling (compiler caches are reset before
    every run, so each run counts its own graphs, as a fresh process would), and the graph count after
    every step (`graphs_by_step`, with each step's online pairs: when a graph was built, and by what);
  - steps skipped as non-finite, and what the first skip says was non-finite;
  - the loop's steady generation time / one bare sampling call with the same settings and rows
    (the microbenchmark; target <= 1.3);
  - peak GPU memory (torch.cuda.max_memory_allocated), and, with `--t4`, the same run again with
    the process's GPU memory capped at a T4's 15 GiB (torch.cuda.set_per_process_memory_fraction).
`--precision`: "bf16" (bf16 weights, bf16 autocast: notebook 06 on a bf16 GPU, the default on CUDA), "fp16"
(fp32 weights, fp16 autocast with loss scaling: notebook 06's T4 path, judge in fp32 too), "fp32".
The variants exist to find why steps were skipped on CUDA (`cudagraph_isolation`, `generation_compile`,
`generation_cache`, `generation_shapes`, `cudnn_attention`): one GPU call runs them all (`--diagnose`).

Before the runs, the attention check (`attention_check`) tests the likely cause directly: cuDNN's
attention backward returning NaN query gradients for seq_len % 128 == 64 with a mask (pytorch#196678),
on the kernel alone and through the policy's `sequence_logprobs`, with and without the loop's guard.

    python benchmarks/bench_loop.py                          # tiny shapes, CPU, ~1 min (run by the tests)
    python benchmarks/bench_loop.py --size real --t4 --out runs/bench_loop.json           # one GPU
    python benchmarks/bench_loop.py --size real --diagnose --methods online-dpo --steps 8  # root cause
    python benchmarks/bench_loop.py --size real --t4-only --precision fp16 --methods online-dpo  # the T4 path
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from common import EOS, PAD, build_tokenizer, make_batch, random_texts

from sail_min.cli import UserError, parse_set
from sail_min.config import SAILConfig
from sail_min.labels import RewardModelScorer
from sail_min.sampling import compile_stats, truncate_prompts_left
from sail_min.logprobs import sequence_logprobs
from sail_min.runtime import Runtime, attention_kernels, autocast, enable_gradient_checkpointing
from sail_min.train import Task, train

SIZES = {
    "real": dict(policy=dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
                             rope_theta=1_000_000.0, rms_norm_eps=1e-6),
                 judge=dict(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960),
                 lora_rank=16, pairs_per_step=8, max_new_tokens=128, max_prompt_tokens=256, prompt_tokens=(20, 200),
                 eval_prompts=128, steps=20, eval_every=10, train_prompts=512, preferences=512, response_tokens=(32, 128)),
    "tiny": dict(policy=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
                 judge=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024),
                 lora_rank=4, pairs_per_step=4, max_new_tokens=8, max_prompt_tokens=32, prompt_tokens=(4, 24),
                 eval_prompts=16, steps=6, eval_every=3, train_prompts=32, preferences=32, response_tokens=(2, 8)),
}
DIAGNOSE = [  # one change each from the default (static cache, fixed shapes, CUDA graphs, isolation on)
    {}, {"cudagraph_isolation": False}, {"generation_compile": "no-cudagraphs"}, {"generation_compile": "off"},
    {"generation_shapes": "bucketed"}, {"generation_cache": "dynamic"}, {"cudnn_attention": True},
]
CHECK_LENGTHS = (320, 384)                # 320 = 2 x 128 + 64: the lengths pytorch#196678 fails at; 384: a control
T4_BYTES = 15 * 2**30                     # a T4's 16 GB card shows ~15 GiB to torch
PRECISIONS = {  # --precision: (weights dtype of policy and judge, SAILConfig.mixed_precision)
    "bf16": (torch.bfloat16, "bf16"),      # notebook 06 on a GPU with bf16
    "fp16": (torch.float32, "fp16"),       # notebook 06 on a T4: fp32 weights, fp16 autocast + loss scaling
    "fp32": (torch.float32, "no"),
}


def precision_for(name: str, device: torch.device) -> str:
    """--precision auto: bf16 on CUDA, fp32 on a CPU (bf16 there is slow)."""
    return name if name != "auto" else ("bf16" if device.type == "cuda" else "fp32")


def build_models(size: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(LoRA policy, its tokenizer, judge): random weights from configs."""
    import peft
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForSequenceClassification
    torch.manual_seed(seed)
    with torch.device(device):
        base = Qwen2ForCausalLM(Qwen2Config(**size["policy"], tie_word_embeddings=True, pad_token_id=PAD,
                                            eos_token_id=EOS, bos_token_id=None)).to(dtype)
        judge_model = Qwen3ForSequenceClassification(Qwen3Config(**size["judge"], num_labels=1, pad_token_id=PAD,
                                                                 eos_token_id=EOS, bos_token_id=None)).to(dtype)
    lora = peft.LoraConfig(r=size["lora_rank"], lora_alpha=2 * size["lora_rank"], lora_dropout=0.0,
                           target_modules="all-linear", task_type="CAUSAL_LM")
    tokenizer = build_tokenizer(size["policy"]["vocab_size"])
    policy = peft.get_peft_model(base, lora)
    return policy, tokenizer, RewardModelScorer(judge_model, tokenizer, batch_size=32)


def build_task(size: dict, judge, seed: int = 0) -> Task:
    """Random-word prompts of 20-200 tokens (real size) and dataset pairs, TRL's plain-text format."""
    vocab = size["policy"]["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    prompts = lambda n: random_texts(n, size["prompt_tokens"], vocab, g)  # noqa: E731
    preference_prompts = prompts(size["preferences"])
    chosen, rejected = (random_texts(size["preferences"], size["response_tokens"], vocab, g) for _ in range(2))
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(preference_prompts, chosen, rejected)]
    return Task(rows, prompts(size["train_prompts"]), prompts(size["eval_prompts"]), judge)


def attention_check(size: dict, device: torch.device) -> list[dict]:
    """Non-finite gradient values of one attention backward, per length in CHECK_LENGTHS:

    kernel  `scaled_dot_product_attention` alone (bf16, 14 heads of 64, a boolean mask): rows with left
            padding (query rows with nothing to attend to), and unpadded rows whose logits are all about
            -100 (every logsumexp below -88.7); with cuDNN forced, PyTorch's own choice, and its choice
            under the loop's guard (`attention_kernels`, cudnn_attention=False). CUDA only.
    policy  `sequence_logprobs` of the policy (LoRA, bf16 autocast, gradient checkpointing) on
            2 x pairs_per_step left-padded rows, forward and backward, cudnn_attention True / False."""
    results = []
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        choices = {"cudnn forced": lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]),
                   "default": contextlib.nullcontext,
                   "default, guard on": lambda: attention_kernels(False)}
        for length in CHECK_LENGTHS:
            for case in ("left padding", "logits ~ -100"):
                g = torch.Generator(device).manual_seed(length)
                q, k, v = (torch.randn(2, 14, length, 64, device=device, generator=g).to(torch.bfloat16)
                           for _ in range(3))
                keep = torch.ones(2, length, dtype=torch.bool, device=device)
                if case == "left padding":
                    keep[0, : length // 3] = False                                 # row 0: a third is padding
                else:                                                          # q.k / 8 = -100 at every pair
                    q[..., 0], k[..., 0] = 1.0, -800.0
                mask = torch.ones(length, length, dtype=torch.bool, device=device).tril() & keep[:, None, None, :]
                for name, choice in choices.items():
                    q_ = q.clone().requires_grad_()
                    try:
                        with choice():
                            out = torch.nn.functional.scaled_dot_product_attention(q_, k, v, attn_mask=mask)
                            out.backward(torch.ones_like(out))
                        bad = int((~torch.isfinite(q_.grad)).sum())
                    except RuntimeError as error:                             # cuDNN not available here
                        bad = f"unavailable ({str(error).splitlines()[0][:60]})"
                    results.append({"check": "kernel", "length": length, "case": case, "kernels": name,
                                    "nonfinite_grad_values": bad})
    policy, tokenizer, judge = build_models(size, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    del judge
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")    # inside peft
    enable_gradient_checkpointing(policy)
    policy.train()
    rows, vocab = 2 * size["pairs_per_step"], size["policy"]["vocab_size"]
    for length in CHECK_LENGTHS:
        batch = make_batch(rows, length, length - size["max_new_tokens"], vocab, device,
                           torch.Generator().manual_seed(length))
        for allowed in (True, False):
            config = SAILConfig(mixed_precision="bf16" if device.type == "cuda" else "no", cudnn_attention=allowed)
            policy.zero_grad(set_to_none=True)
            with autocast(config.mixed_precision, device), attention_kernels(config.cudnn_attention):
                logps = sequence_logprobs(policy, *batch)
            with attention_kernels(config.cudnn_attention):
                logps.sum().backward()
            bad = sum(int((~torch.isfinite(p.grad)).sum()) for p in policy.parameters() if p.grad is not None)
            results.append({"check": "policy", "length": length, "case": f"{rows} left-padded rows",
                            "kernels": f"cudnn_attention={allowed}", "nonfinite_grad_values": bad,
                            "logps_finite": bool(torch.isfinite(logps).all())})
    del policy
    return results


def run(method: str, overrides: dict, size: dict, device: torch.device, steps: int, out: Path, cap: int | None,
        precision: str = "auto") -> dict:
    """One train() run; the numbers of the table."""
    precision = precision_for(precision, device)
    dtype, mixed_precision = PRECISIONS[precision]
    torch.compiler.reset()                  # this run's graphs only: none reused from an earlier run in the process
    breaks_before = graph_breaks()
    policy, tokenizer, judge = build_models(size, device, dtype)
    task = build_task(size, judge)
    config = SAILConfig.preset(
        method, steps=steps, pairs_per_step=size["pairs_per_step"], max_new_tokens=size["max_new_tokens"],
        max_prompt_tokens=size["max_prompt_tokens"], eval_prompts=size["eval_prompts"],
        eval_every=min(size["eval_every"], steps), lr=5e-5, checkpoint_every=0,
        mixed_precision=mixed_precision, gradient_checkpointing=True,
        **{"generation_cache": "static", **overrides}, output_dir=str(out))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if cap:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    start = time.perf_counter()
    error = None
    with warnings.catch_warnings(record=True) as caught:          # kept: skips are counted below, and a
        warnings.simplefilter("always", RuntimeWarning)            # static-cache fallback is reported
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")   # inside peft
        try:
            history = train(config, policy, tokenizer, task, progress=False)
        except torch.OutOfMemoryError as oom:                      # the T4 cap: say so, go on
            history, error = [], f"out of memory: {str(oom).splitlines()[0]}"
    fallback = next((str(w.message)[:400] for w in caught if "static-cache generation failed" in str(w.message)),
                    None)                                          # the sampler then used the dynamic cache
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    breaks = {reason: n - breaks_before.get(reason, 0) for reason, n in graph_breaks().items()
              if n > breaks_before.get(reason, 0)}
    graphs_before_micro = compile_stats()["graphs"]
    micro = sampler_alone(policy, tokenizer, task, config, device) if history else None
    micro_graphs = compile_stats()["graphs"] - graphs_before_micro        # expected 0: the loop built its shape
    if device.type == "cuda" and cap:
        torch.cuda.set_per_process_memory_fraction(1.0)
    del policy, judge
    if not history:
        return {"method": method, "overrides": overrides, "precision": precision, "error": error, "peak_gib": peak,
                "static_cache_fallback": fallback}
    compiled = [h.get("compile/graphs", 0) for h in history]
    steady = [h for i, h in enumerate(history) if i >= 3 and compiled[i] == compiled[i - 1]] or history[-1:]
    median = lambda key: statistics.median(h[key] for h in steady)  # noqa: E731
    evals = [h["time/evaluate"] for h in history if "time/evaluate" in h]
    skips = [h for h in history if "skip/what" in h]
    online = [sum(h.get(f"pairs/{route}", 0) for route in ("pp", "pr")) for h in history]
    return {"method": method, "overrides": overrides, "precision": precision, "steps": len(history), "wall_s": wall,
            "step_s": median("time/generate") + median("time/label") + median("time/train"),
            "generate_s": median("time/generate"), "label_s": median("time/label"), "train_s": median("time/train"),
            "evaluate_s": evals[-1] if evals else None, "compilations": history[-1].get("compile/graphs", 0),
            "compile_s": history[-1].get("compile/seconds", 0.0), "skipped_steps": history[-1]["skipped_steps"],
            "first_skip": skips[0]["skip/what"] if skips else None, "peak_gib": peak,
            "judge_truncated_inputs": history[-1].get("judge_truncated_inputs"),
            "sampler_alone_s": micro, "generate_vs_sampler_alone": median("time/generate") / micro,
            "sampler_alone_new_graphs": micro_graphs, "graph_breaks": breaks, "static_cache_fallback": fallback, "graphs_by_step": compiled, "online_pairs_by_step": online,
            "eval_steps": [h["step"] for h in history if "time/evaluate" in h]}


def graph_breaks() -> dict:
    """dynamo's graph breaks so far in this process, by reason (each break splits a compiled frame in two graphs)."""
    if "torch._dynamo.utils" not in sys.modules:
        return {}
    from torch._dynamo.utils import counters
    return {str(reason)[:200]: int(n) for reason, n in counters["graph_break"].items()}


def sampler_alone(policy, tokenizer, task: Task, config: SAILConfig, device: torch.device, repeats: int = 3) -> float:
    """Seconds of one bare sampling call with the loop's settings and rows (2 x pairs_per_step), after the
    run (its graphs exist): the microbenchmark the loop's steady generation time is compared with."""
    prompts, _ = truncate_prompts_left(tokenizer, list(task.train_prompts[: config.pairs_per_step]),
                                       config.max_prompt_tokens)
    sampler = Runtime(config).sampler(tokenizer, rows=2 * config.pairs_per_step)
    times = []
    for i in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sampler(policy, prompts, k=2, seed=i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def describe(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"


def parse_variant(text: str) -> dict:
    """'generation_compile=off,cudagraph_isolation=false' -> SAILConfig overrides (the CLI's --set rules)."""
    try:
        return parse_set(list(filter(None, text.split(","))), SAILConfig().to_dict())
    except UserError as error:
        sys.exit(f"--variant {text!r}: {error}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--methods", default="online-dpo,sail-pr,sail-pp", help="comma-separated presets")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 20 real, 6 tiny)")
    parser.add_argument("--variant", action="append", default=None, metavar="FIELD=VALUE,...",
                        help="SAILConfig overrides of one variant (repeat for several; default: the defaults)")
    parser.add_argument("--diagnose", action="store_true", help="the variants that isolate the skip's cause")
    parser.add_argument("--t4", action="store_true", help="also run each method with GPU memory capped at 15 GiB")
    parser.add_argument("--t4-only", action="store_true", help="run each method only with the 15 GiB cap")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="weights and autocast: bf16, fp16 (fp32 weights + fp16 autocast, a T4's), fp32; "
                             "auto: bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no run that the latest run's length says would end after this many seconds")
    parser.add_argument("--no-attention-check", action="store_true", help="skip the cuDNN attention check")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="write every number to this JSON file")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    steps = args.steps or size["steps"]
    variants = DIAGNOSE if args.diagnose else [parse_variant(v) for v in args.variant or [""]]
    print(f"bench_loop: size {args.size}, {steps} steps/run, device {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    started = time.perf_counter()

    def save(checks, results):                        # after every run: a killed call keeps what it measured
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"size": args.size, "device": str(device), "attention_check": checks,
                                            "results": results}, indent=1))

    checks = [] if args.no_attention_check else attention_check(size, device)
    save(checks, [])
    if checks:
        print(f"\n{'check':7s} {'length':>6s} {'case':22s} {'kernels':24s} non-finite gradient values")
        for c in checks:
            print(f"{c['check']:7s} {c['length']:6d} {c['case']:22s} {c['kernels']:24s} {c['nonfinite_grad_values']}")
        print(flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        caps = ([T4_BYTES] if args.t4_only else [None, T4_BYTES] if args.t4 else [None]) if device.type == "cuda" else [None]
        latest = 0.0                                  # seconds of the latest run (the first one also compiles cold)
        for overrides in variants:
            for method in args.methods.split(","):
                for cap in caps:
                    elapsed = time.perf_counter() - started
                    if args.budget_s is not None and elapsed + latest > args.budget_s:
                        print(f"not run (--budget-s {args.budget_s:g}): {method} {describe(overrides)} "
                              f"{precision_for(args.precision, device)}"
                              f"{' T4' if cap else ''}", flush=True)
                        continue
                    out = Path(tmp) / f"{method}-{len(results)}"
                    run_start = time.perf_counter()
                    result = run(method, overrides, size, device, steps, out, cap, args.precision) | {"t4_cap": bool(cap)}
                    latest = time.perf_counter() - run_start
                    results.append(result)
                    print(json.dumps(result), flush=True)
                    save(checks, results)
    head = (f"{'method':11s} {'variant':38s} {'prec':>4s} {'T4':>3s} {'step s':>7s} {'gen':>6s} {'label':>6s} {'train':>6s} "
            f"{'eval s':>7s} {'graphs':>6s} {'comp s':>7s} {'skipped':>7s} {'peak GiB':>8s} {'gen/alone':>9s}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['method']:11s} {describe(r['overrides']):38s} {r['precision']:>4s} "
                  f"{'yes' if r['t4_cap'] else '':>3s} {r['error']}")
            continue
        fmt = lambda v, w, p: f"{v:{w}.{p}f}" if v is not None else f"{'-':>{w}s}"  # noqa: E731
        print(f"{r['method']:11s} {describe(r['overrides']):38s} {r['precision']:>4s} {'yes' if r['t4_cap'] else '':>3s} "
              f"{fmt(r['step_s'], 7, 2)} {fmt(r['generate_s'], 6, 2)} {fmt(r['label_s'], 6, 2)} {fmt(r['train_s'], 6, 2)} "
              f"{fmt(r['evaluate_s'], 7, 2)} {r['compilations']:6d} {fmt(r['compile_s'], 7, 1)} "
              f"{r['skipped_steps']:3d}/{r['steps']:<3d} {fmt(r['peak_gib'], 8, 2)} "
              f"{fmt(r['generate_vs_sampler_alone'], 9, 2)}")
    for r in results:
        if "graphs_by_step" in r:
            print(f"graphs after each step, {r['method']} {describe(r['overrides'])} {r['precision']}: "
                  f"{r['graphs_by_step']} (online pairs {r['online_pairs_by_step']}, evaluations after steps "
                  f"{r['eval_steps']}; a bare sampling call afterwards built {r['sampler_alone_new_graphs']})")
    for r in results:
        if r.get("static_cache_fallback"):
            print(f"static cache fell back to the dynamic one, {r['method']} {r['precision']}: {r['static_cache_fallback']}")
    for r in results:
        if r.get("first_skip"):
            print(f"first skip, {r['method']} {describe(r['overrides'])}: {r['first_skip']}")


if __name__ == "__main__":
    main()
