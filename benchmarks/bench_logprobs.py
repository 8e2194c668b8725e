"""Peak memory and time of lean vs naive sequence log-probs (forward + backward), as ratios.

    naive  log_softmax over the full [B, L, V] logits in fp32, gather y_t, mask, sum
    lean   sail_min.logprobs.sequence_logprobs: response tokens only, logits for `chunk_size`
           tokens at a time, recomputed in backward (torch.utils.checkpoint)

Both compute l(y|x) = sum_t log pi(y_t | x, y_<t) and its gradient for a Qwen2-shaped model
with a large vocabulary and a tiny hidden size (random weights), so that the logits dominate
memory: 16 x 512 tokens x 151,936 vocab by default. The script first checks that the two
agree (values and gradients), then times each one `--repeats` times, alternating, in this
one process, and prints the medians and the ratios lean / naive.

How peak memory is measured.
  --device cuda: torch.cuda.max_memory_allocated() minus the allocation before the call,
      after torch.cuda.reset_peak_memory_stats(): exact, for tensors.
  --device cpu: torch has no peak counter for its CPU allocator (and tracemalloc does not
      see it), so a thread reads the process's resident set size (RSS) from /proc/self/statm
      every millisecond while the call runs; peak = max RSS - RSS just before. Before each
      call glibc's malloc_trim(0) returns freed heap memory to the OS, so one variant cannot
      hide in memory the other one left behind (tensors this large are mmap-ed and returned
      on free anyway). RSS counts everything the process touches (autograd buffers,
      gradients, allocator slack), which is what would run out; a peak shorter than the 1 ms
      sampling interval could be missed, but multi-GB logits live far longer than that.

Run from the repository root, e.g.
    python benchmarks/bench_logprobs.py                      # CPU, 16 x 512, needs ~20 GB RAM
    python benchmarks/bench_logprobs.py --batch 4            # CPU, smaller (~5 GB for naive)
    python benchmarks/bench_logprobs.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from common import PeakRSS, make_batch, naive_sequence_logprobs, release_freed_memory
from sail_min.logprobs import sequence_logprobs


def measure(fn, model, device):
    """(seconds, peak bytes) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn().sum().backward()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - before
    release_freed_memory()
    with PeakRSS() as peak:
        start = time.perf_counter()
        fn().sum().backward()
        seconds = time.perf_counter() - start
    return seconds, peak.bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=512, help="response tokens per chunk (lean)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.length, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=getattr(torch, args.dtype)).train()
    batch = make_batch(args.batch, args.length, args.prompt_length, args.vocab, device,
                       torch.Generator().manual_seed(0))
    lean = lambda: sequence_logprobs(model, *batch, chunk_size=args.chunk_size)  # noqa: E731
    naive = lambda: naive_sequence_logprobs(model, *batch)                       # noqa: E731

    print(f"device {args.device}, dtype {args.dtype}, {args.batch} x {args.length} tokens "
          f"({int(batch[2].sum())} response tokens), vocab {args.vocab}, hidden {args.hidden}, "
          f"chunk {args.chunk_size} tokens, torch threads {torch.get_num_threads()}")

    # Agreement first: values and the gradient of the lm_head/embedding weight.
    lean_values = lean()
    lean_values.sum().backward()
    lean_grad = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad(set_to_none=True)
    naive_values = naive()
    naive_values.sum().backward()
    naive_grad = model.get_output_embeddings().weight.grad
    value_error = (lean_values - naive_values).abs().max().item() / naive_values.abs().max().item()
    grad_error = (lean_grad - naive_grad).abs().max().item() / naive_grad.abs().max().item()
    print(f"agreement: max relative difference, values {value_error:.1e}, lm_head gradient {grad_error:.1e}")
    del lean_values, naive_values, lean_grad, naive_grad

    results = {"lean": [], "naive": []}
    for _ in range(args.repeats):
        for name, fn in (("lean", lean), ("naive", naive)):
            results[name].append(measure(fn, model, device))
    summary = {}
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        peak = statistics.median(b for _, b in runs)
        summary[name] = (seconds, peak)
        print(f"{name:>5}: {seconds:7.3f} s   peak {peak / 2**30:6.2f} GiB   (median of {args.repeats})")
    (lean_s, lean_b), (naive_s, naive_b) = summary["lean"], summary["naive"]
    print(f"ratio lean / naive: peak memory {lean_b / naive_b:.3f}, time {lean_s / naive_s:.3f}")


if __name__ == "__main__":
    main()
