"""What one SAIL iteration costs, as ratios against baselines measured in the same process.

    1. step       SAIL step / DPO step, time. One step = policy log-probs with gradient
                  (sail_min.logprobs.sequence_logprobs), reference log-probs without, sail_loss,
                  backward, AdamW step, on the same batch of pairs. DPO: response_mode "off", no
                  extra term; SAIL: response term 0.3 (exact, "loo" baseline) + label term 0.2.
    2. memory     lean / naive training step (the DPO step above), peak memory and time:
                    naive        full-vocab fp32 log_softmax at every position, then gather
                    lean         sequence_logprobs: response tokens only, logits in chunks
                    lean + ckpt  lean with the model's gradient checkpointing on
                  and how far their per-sequence log-probs (and one weight's gradient) differ.
    3. generate   new tokens / s of sample_responses (the sampler, with the dynamic and with the
                  static KV cache) against plain `model.generate` (dynamic cache, the same
                  sampling settings, token ids given), in steady state (warm-up calls excluded);
                  the static path's FIRST call (where transformers compiles on CUDA) separately;
                  the first call after an optimizer step changed the weights in place; and
                  whether greedy decoding gives the same tokens on the static and plain paths.
    4. iteration  seconds generating (the sampler) / labelling (a small sequence-classifier
                  reward model built from a config, through sail_min.labels) / training (log-probs,
                  sail_loss, backward, AdamW step) in one online iteration.

Models are built from a config with random weights (nothing is downloaded), with a word-level
tokenizer over their vocabulary built in memory:
    --model tiny        Qwen2, 2 layers, hidden 64, vocab 512 (the shape of data/tiny/policy);
                        small sizes, runs on CPU in well under a minute with one thread.
    --model qwen2-0.5b  Qwen2-0.5B's shape: 24 layers, hidden 896, 14 heads (2 KV), MLP 4864,
                        vocab 151,936, tied embeddings (494 M parameters). Step: 8 pairs x 512
                        tokens; generation: batch 64 (32 prompts x 2) x 128 new tokens after
                        64-token prompts. Meant for one GPU.

Precision. CPU: fp32 throughout. CUDA: the training steps (1, 2) keep fp32 weights and run
forward passes under bf16 autocast (what train.py does with mixed_precision="bf16"), with fused
AdamW; generation and the online iteration (3, 4) use a bf16 copy of the model (pure bf16).

Timing: wall clock around each call, with torch.cuda.synchronize() on CUDA; medians of
`--repeats` calls, the variants of one comparison alternating so drift hits them alike.

Peak memory:
    CUDA  torch.cuda.max_memory_allocated() after torch.cuda.reset_peak_memory_stats(): the
          ABSOLUTE peak of tensors during the step (weights, gradients, AdamW state,
          reference model, activations), which is what the 16 GB target is about.
    CPU   a proxy: the rise of the process's resident set size during the step, sampled every
          millisecond from /proc/self/statm (PeakRSS in bench_logprobs.py), after malloc_trim.
          It includes allocator slack and misses nothing that lives longer than ~1 ms, but at
          the tiny model's sizes it is at the resolution of the allocator: read it as "small".

Run from the repository root:
    python benchmarks/bench_sail.py                                   # tiny, CPU
    python benchmarks/bench_sail.py --model qwen2-0.5b --out runs/bench_sail.json   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from common import (EOS, PAD, PeakRSS, build_tokenizer, make_batch, make_prompts, naive_sequence_logprobs,
                    release_freed_memory, synchronize, timed)
from sail_min.labels import RewardModelScorer, reward_model_labels
from sail_min.logprobs import ReferenceModel, sequence_logprobs
from sail_min.objective import sail_loss
from sail_min.sampling import (cut_at_first_eos, eos_token_ids, static_cache_failed,
                               generation_config, sample_responses)

MODELS = {
    # the shape of data/tiny/policy
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    # Qwen/Qwen2-0.5B's config.json
    "qwen2-0.5b": dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6),
}
SIZES = {  # pairs x length: the training step; gen_batch x new_tokens after gen_prompt_length: generation
    "tiny": dict(pairs=8, length=64, prompt_length=16, gen_batch=16, new_tokens=32, gen_prompt_length=16, repeats=9),
    "qwen2-0.5b": dict(pairs=8, length=512, prompt_length=64, gen_batch=64, new_tokens=128, gen_prompt_length=64,
                       repeats=5),
}
TARGETS = {  # for qwen2-0.5b on one GPU
    "sail_vs_dpo_time": "<= 1.05",
    "lean_ckpt_peak_gb": "<= 16",
    "sampler_static_vs_generate_tokens_per_s": ">= 4",
}
BETA, LR = 0.1, 1e-6
DPO = dict(response_coef=0.0, label_coef=0.0, response_mode="off")
SAIL = dict(response_coef=0.3, label_coef=0.2, response_mode="exact", baseline="loo")


# --------------------------------------------------------------------------------------
# model, tokenizer, prompts: all built here
# --------------------------------------------------------------------------------------
def build_config(name: str) -> Qwen2Config:
    return Qwen2Config(**MODELS[name], tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS,
                       bos_token_id=None)


def set_checkpointing(model, enable: bool) -> None:
    """transformers >= 5.2x calls it activation checkpointing; older ones gradient checkpointing."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_{'enable' if enable else 'disable'}")()


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------
def timed_with_peak(fn, device: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes): absolute peak of allocated tensors on CUDA, RSS rise on CPU."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        seconds, _ = timed(fn, device)
        return seconds, torch.cuda.max_memory_allocated()
    release_freed_memory()
    with PeakRSS() as peak:
        seconds, _ = timed(fn, device)
    return seconds, peak.bytes


def alternate(variants: dict, repeats: int, measure):
    """measure(fn) for each variant in turn, `repeats` rounds; {name: [result, ...]}."""
    results = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            results[name].append(measure(fn))
    return results


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max_i |a_i - b_i| / |b_i| (per element: each sequence's log-prob on its own scale)."""
    return ((a.double() - b.double()).abs() / b.double().abs().clamp(min=1e-30)).max().item()


def max_normalised_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, for gradients (whose elements may be ~0)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


# --------------------------------------------------------------------------------------
# 1 + 2: training steps
# --------------------------------------------------------------------------------------
def train_step(policy, reference_model, optimizer, batch, pairs: int, logprobs_fn, loss_options: dict,
               autocast) -> None:
    """One step on `pairs` pairs: rows [0, pairs) chosen, [pairs, 2 pairs) rejected."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        policy_logps = logprobs_fn(policy, *batch)
        with torch.no_grad():
            ref_logps = logprobs_fn(reference_model, *batch)
    loss = sail_loss(policy_logps[:pairs], policy_logps[pairs:], ref_logps[:pairs], ref_logps[pairs:],
                     BETA, **loss_options).loss
    loss.backward()
    optimizer.step()


def bench_steps(config, sizes: dict, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    with torch.device(device):                                             # initialised where it runs
        policy = Qwen2ForCausalLM(config).train()                          # fp32 weights
    reference = ReferenceModel(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, fused=device.type == "cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    pairs = sizes["pairs"]
    batch = make_batch(2 * pairs, sizes["length"], sizes["prompt_length"], config.vocab_size, device,
                       torch.Generator().manual_seed(0))
    lean = sequence_logprobs

    def step(logprobs_fn, loss_options, checkpointing=False):
        def run():
            set_checkpointing(policy, checkpointing)
            try:
                train_step(policy, reference.model, optimizer, batch, pairs, logprobs_fn, loss_options, autocast())
            finally:
                set_checkpointing(policy, False)
        return run

    # Agreement, before any optimizer step: log-probs and the gradient of the first layer's
    # MLP down-projection (reached through every layer, so checkpointing is exercised).
    probe = policy.get_decoder().layers[0].mlp.down_proj.weight
    values, grads = {}, {}
    for name, fn, checkpointing in (("naive", naive_sequence_logprobs, False), ("lean", lean, False),
                                    ("lean_ckpt", lean, True)):
        set_checkpointing(policy, checkpointing)
        policy.zero_grad(set_to_none=True)
        with autocast():
            out = fn(policy, *batch)
        out.sum().backward()
        values[name], grads[name] = out.detach().float().cpu(), probe.grad.float().cpu()
        set_checkpointing(policy, False)
    policy.zero_grad(set_to_none=True)
    agreement = {f"{name}_vs_naive": {"logps_max_rel_diff": max_relative_difference(values[name], values["naive"]),
                                      "grad_max_norm_diff": max_normalised_difference(grads[name], grads["naive"])}
                 for name in ("lean", "lean_ckpt")}

    # 1. SAIL vs DPO (lean log-probs, no checkpointing); one warm-up step each (AdamW state, kernels)
    variants = {"dpo": step(lean, DPO), "sail": step(lean, SAIL)}
    for fn in variants.values():
        fn()
    times = alternate(variants, repeats, lambda fn: timed(fn, device)[0])
    sail_vs_dpo = {f"{name}_s": statistics.median(t) for name, t in times.items()}
    sail_vs_dpo["ratio"] = sail_vs_dpo["sail_s"] / sail_vs_dpo["dpo_s"]

    # 2. lean vs naive, peak memory and time (DPO steps)
    variants = {"naive": step(naive_sequence_logprobs, DPO), "lean": step(lean, DPO),
                "lean_ckpt": step(lean, DPO, checkpointing=True)}
    for fn in variants.values():
        fn()
    runs = alternate(variants, repeats, lambda fn: timed_with_peak(fn, device))
    memory = {name: {"seconds": statistics.median(s for s, _ in r), "peak_bytes": statistics.median(b for _, b in r)}
              for name, r in runs.items()}
    for name in ("lean", "lean_ckpt"):
        memory[name]["time_vs_naive"] = memory[name]["seconds"] / memory["naive"]["seconds"]
        memory[name]["peak_vs_naive"] = memory[name]["peak_bytes"] / max(memory["naive"]["peak_bytes"], 1)
    del policy, reference, optimizer
    return {"sail_vs_dpo": sail_vs_dpo, "lean_vs_naive": memory, "agreement": agreement,
            "peak_memory_method": ("cuda max_memory_allocated, absolute" if device.type == "cuda"
                                   else "cpu RSS rise during the step (proxy)")}


# --------------------------------------------------------------------------------------
# 3: generation
# --------------------------------------------------------------------------------------
def dynamo_graphs() -> int | None:
    """Graphs torch.compile has built so far in this process (None if the counter is unavailable)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def bench_generation(model, tokenizer, prompts: list[str], k: int, new_tokens: int, device, repeats: int) -> dict:
    """Sampler (dynamic / static cache) vs plain `generate`, new tokens per second."""
    rows = k * len(prompts)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    input_ids, attention_mask = batch.input_ids.repeat_interleave(k, 0), batch.attention_mask.repeat_interleave(k, 0)
    eos_ids = eos_token_ids(model, tokenizer)
    prompt_length = input_ids.shape[1]

    def plain(greedy=False, tokens=new_tokens):
        config = generation_config(tokenizer, eos_ids, tokens, greedy=greedy)       # dynamic cache
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)

    def sampler(cache, greedy=False, seed=0, tokens=new_tokens):
        return sample_responses(model, tokenizer, prompts, k=k, max_new_tokens=tokens, seed=seed,
                                greedy=greedy, cache=cache)

    def seconds_and_tokens(fn):
        """(seconds, new tokens): rows x positions generated (all rows run until the last one stops)."""
        seconds, out = timed(fn, device)
        generated = out.shape[1] - prompt_length if isinstance(out, torch.Tensor) else out.response_ids.shape[1]
        return seconds, rows * generated

    # warm-ups of the dynamic paths first, so the static path's first call times its own set-up
    for _ in range(2):
        plain()
        sampler("dynamic")
    graphs_before = dynamo_graphs()
    first_static_s, _ = timed(lambda: sampler("static"), device)
    fell_back = static_cache_failed(model)          # the static path raised: the sampler warned, runs dynamic
    compiled = hasattr(model, "_compiled_call") and not fell_back
    for _ in range(2):                                  # CUDA graphs are recorded on the next calls
        sampler("static")
    graphs_warm = dynamo_graphs()
    runs = alternate({"generate": plain, "sampler_dynamic": lambda: sampler("dynamic"),
                      "sampler_dynamic_unseeded": lambda: sampler("dynamic", seed=None),
                      "sampler_static": lambda: sampler("static")}, repeats, seconds_and_tokens)
    result = {name: statistics.median(tokens / seconds for seconds, tokens in r) for name, r in runs.items()}
    steady_static_s = statistics.median(seconds for seconds, _ in runs["sampler_static"])
    # The sampler's own per-call work (tokenising prompts, forking the RNG, cutting at EOS, decoding texts):
    # one new token each, where the model's share is smallest. Per token both run the same processors.
    one_token = alternate({"generate": lambda: plain(tokens=1), "sampler": lambda: sampler("dynamic", tokens=1)},
                          max(repeats, 3), lambda fn: timed(fn, device)[0])
    per_call_s = statistics.median(one_token["sampler"]) - statistics.median(one_token["generate"])
    plain_call_s = statistics.median(seconds for seconds, _ in runs["generate"])

    # an optimizer step changes the weights in place; the next static call must not compile again
    before = model.get_decoder().layers[0].mlp.down_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    responses = sampler("dynamic", seed=1).select(slice(0, 2))
    model.train()
    sequence_logprobs(model, **{key: v.to(device) for key, v in responses.model_inputs().items()}).mean().backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    changed = not torch.equal(before, model.get_decoder().layers[0].mlp.down_proj.weight)
    del optimizer, before
    after_update_s, _ = timed(lambda: sampler("static"), device)
    graphs_after = dynamo_graphs()

    # greedy: the same tokens from the sampler's static path and from plain generate?
    static_greedy = sampler("static", greedy=True)
    plain_ids, plain_mask, _ = cut_at_first_eos(plain(greedy=True)[:, prompt_length:], eos_ids, tokenizer.pad_token_id)
    width = max(plain_ids.shape[1], static_greedy.response_ids.shape[1])
    pad = lambda t: torch.nn.functional.pad(t.cpu(), (0, width - t.shape[1]), value=-1)  # noqa: E731
    same_rows = (pad(plain_ids * plain_mask) == pad(static_greedy.response_ids * static_greedy.response_mask)).all(1)

    result.update({
        "rows": rows, "new_tokens": new_tokens, "prompt_tokens": prompt_length,
        "sampler_dynamic_vs_generate": result["sampler_dynamic"] / result["generate"],
        "sampler_unseeded_vs_generate": result["sampler_dynamic_unseeded"] / result["generate"],
        "sampler_per_call_overhead_s": per_call_s,
        "sampler_vs_generate_from_overhead": plain_call_s / (plain_call_s + per_call_s),
        "sampler_static_vs_generate": result["sampler_static"] / result["generate"],
        "static_compiled": compiled, "static_fell_back_to_dynamic": fell_back,
        "static_first_call_s": first_static_s, "static_steady_call_s": steady_static_s,
        "static_first_vs_steady": first_static_s / steady_static_s,
        "weights_changed_in_place": changed,
        "static_after_update_s": after_update_s, "static_after_update_vs_steady": after_update_s / steady_static_s,
        "compiled_graphs": {"before_first_static": graphs_before, "after_warmup": graphs_warm,
                            "after_update_call": graphs_after},
        "greedy_identical": bool(same_rows.all()), "greedy_identical_rows": f"{int(same_rows.sum())}/{rows}",
    })
    return result


def static_path_agreement(model, tokenizer, prompts: list[str], new_tokens: int, device) -> dict:
    """How the static-cache path (compiled on CUDA) agrees with the plain path, in the model's dtype.

    fp32: greedy tokens, static vs plain generate, must be identical. In bf16 near-tied logits flip
    under round-off, so token identity tests nothing there; instead, for the static path's own greedy
    tokens, the per-token log-probs that its decode steps computed (generate's logits) are compared with a
    full-sequence forward pass without cache (the path the loss uses). Tolerance: 1e-3 nats in fp32,
    0.1 nats in bf16 (bf16 keeps 8 bits of mantissa: logits of size ~10 are off by ~0.04)."""
    eos_ids = eos_token_ids(model, tokenizer)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    def greedy(cache):
        config = generation_config(tokenizer, eos_ids, new_tokens, greedy=True, cache_implementation=cache, model=model)
        config.update(return_dict_in_generate=True, output_logits=True)
        with torch.no_grad():
            return model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  generation_config=config)
    static, plain = greedy("static"), greedy(None)
    width = batch.input_ids.shape[1]
    tokens = static.sequences[:, width:]
    decoded = torch.stack(static.logits, dim=1).float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    mask = torch.cat([batch.attention_mask, torch.ones_like(tokens)], dim=1)
    with torch.no_grad():
        full = model(input_ids=static.sequences, attention_mask=mask,
                     position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, width - 1:-1]
    forward = full.float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    gap = (decoded - forward).abs()
    same = static.sequences.shape == plain.sequences.shape and torch.equal(static.sequences, plain.sequences)
    tolerance = 1e-3 if model.dtype == torch.float32 else 0.1
    return {"dtype": str(model.dtype).replace("torch.", ""), "greedy_identical": bool(same),
            "logprob_max_gap": gap.max().item(), "logprob_mean_gap": gap.mean().item(), "tolerance": tolerance,
            "within_tolerance": bool(gap.max().item() <= tolerance)}


# --------------------------------------------------------------------------------------
# 4: one online iteration
# --------------------------------------------------------------------------------------
def bench_iteration(policy, tokenizer, prompts: list[str], new_tokens: int, pairs_per_micro_batch: int,
                    device: torch.device, dtype: torch.dtype) -> dict:
    """Generate 2 responses per prompt, label each pair with a reward model, one SAIL step
    (gradients accumulated over micro-batches of `pairs_per_micro_batch` pairs). The second of
    two iterations is reported (the first allocates AdamW's state)."""
    reward_config = Qwen2Config(**MODELS["tiny"] | {"vocab_size": policy.config.vocab_size},
                                num_labels=1, pad_token_id=PAD, eos_token_id=EOS)
    torch.manual_seed(1)
    scorer = RewardModelScorer(Qwen2ForSequenceClassification(reward_config).to(device, dtype), tokenizer,
                               batch_size=len(prompts))
    reference = ReferenceModel(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, fused=device.type == "cuda")
    splits = []
    for iteration in range(2):
        seconds_generate, samples = timed(lambda: sample_responses(
            policy, tokenizer, prompts, k=2, max_new_tokens=new_tokens, seed=iteration, cache="static"),
            device)
        seconds_label, labels = timed(lambda: reward_model_labels(
            scorer, prompts, samples.texts[0::2], samples.texts[1::2]), device)

        def train():
            policy.train()
            optimizer.zero_grad(set_to_none=True)
            inputs = {key: v.to(device) for key, v in samples.model_inputs().items()}
            ordered = {key: labels.chosen_rejected(v[0::2], v[1::2]) for key, v in inputs.items()}  # (y_w, y_l)
            n = len(prompts)
            for start in range(0, n, pairs_per_micro_batch):
                rows = slice(start, start + pairs_per_micro_batch)
                both = {key: torch.cat([chosen[rows], rejected[rows]]) for key, (chosen, rejected) in ordered.items()}
                m = both["input_ids"].shape[0] // 2
                policy_logps = sequence_logprobs(policy, **both)
                ref_logps = reference.logprobs(**both)
                loss = sail_loss(policy_logps[:m], policy_logps[m:], ref_logps[:m], ref_logps[m:], BETA, **SAIL,
                                 weights=torch.full((m,), 1.0 / n, device=device)).loss   # mean over all n pairs
                loss.backward()
            optimizer.step()
            policy.eval()

        seconds_train, _ = timed(train, device)
        splits.append({"generate_s": seconds_generate, "label_s": seconds_label, "train_s": seconds_train})
    split = splits[-1]
    total = sum(split.values())
    split.update({f"{key[:-2]}_fraction": value / total for key, value in list(split.items())})
    split.update({"total_s": total, "pairs": len(prompts), "response_tokens": int(samples.lengths.sum())})
    del reference, optimizer
    return split


# --------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=list(MODELS))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="write every number to this JSON file")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    for name in SIZES["tiny"]:
        if name != "repeats":
            parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                                help=f"override the model's size (tiny: {SIZES['tiny'][name]}, "
                                     f"qwen2-0.5b: {SIZES['qwen2-0.5b'][name]})")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    sizes = {name: getattr(args, name, None) or value for name, value in SIZES[args.model].items()}
    sizes["repeats"] = args.repeats or sizes["repeats"]
    if sizes["gen_batch"] % 2 or sizes["length"] <= sizes["prompt_length"]:
        sys.exit("--gen-batch must be even (2 responses per prompt) and --length > --prompt-length")
    gen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = build_config(args.model)
    tokenizer = build_tokenizer(config.vocab_size)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "python": platform.python_version()}
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    print(f"model {args.model} (random weights, {parameters / 1e6:.1f} M "
          f"parameters), device {device} ({env['device']}), torch {env['torch']}, transformers "
          f"{env['transformers']}, {env['threads']} CPU thread(s)")
    print(f"sizes {sizes}; steps: {'fp32 weights + bf16 autocast' if device.type == 'cuda' else 'fp32'}; "
          f"generation/iteration: {str(gen_dtype).removeprefix('torch.')}")
    wall = time.perf_counter()

    # 1 + 2 ---------------------------------------------------------------------------
    steps = bench_steps(config, sizes, device, sizes["repeats"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    s = steps["sail_vs_dpo"]
    print(f"\n[1] step, {sizes['pairs']} pairs x {sizes['length']} tokens (median of {sizes['repeats']}): "
          f"DPO {s['dpo_s'] * 1e3:.1f} ms, SAIL {s['sail_s'] * 1e3:.1f} ms, SAIL / DPO {s['ratio']:.3f}")
    print(f"[2] DPO step, peak memory ({steps['peak_memory_method']}) and time:")
    for name, m in steps["lean_vs_naive"].items():
        extra = (f"   vs naive: time {m['time_vs_naive']:.2f}x, peak {m['peak_vs_naive']:.2f}x"
                 if name != "naive" else "")
        print(f"    {name:>9}: {m['seconds'] * 1e3:8.1f} ms  peak {m['peak_bytes'] / 2**30:7.3f} GiB{extra}")
    for name, a in steps["agreement"].items():
        print(f"    {name}: per-sequence log-probs max rel. diff {a['logps_max_rel_diff']:.1e}, "
              f"gradient (layer 0 down_proj) max diff / max {a['grad_max_norm_diff']:.1e}")

    # 3 -------------------------------------------------------------------------------
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(gen_dtype).eval()
    prompts = make_prompts(sizes["gen_batch"] // 2, sizes["gen_prompt_length"], config.vocab_size, seed=0)
    gen = bench_generation(model, tokenizer, prompts, 2, sizes["new_tokens"], device, sizes["repeats"])
    print(f"\n[3] generation, batch {gen['rows']} x {gen['new_tokens']} new tokens after {gen['prompt_tokens']}-token "
          f"prompts, new tokens / s (median of {sizes['repeats']}, after warm-up):")
    print(f"    plain generate (dynamic cache) {gen['generate']:10.0f}")
    for cache in ("dynamic", "static"):
        print(f"    sampler, {cache + ' cache':<21} {gen[f'sampler_{cache}']:10.0f}   "
              f"{gen[f'sampler_{cache}_vs_generate']:.2f}x")
    print(f"    sampler, {'dynamic, no seed':<21} {gen['sampler_dynamic_unseeded']:10.0f}   "
          f"{gen['sampler_unseeded_vs_generate']:.2f}x")
    print(f"    sampler's own work per call (1-token calls, sampler - generate): "
          f"{gen['sampler_per_call_overhead_s'] * 1e3:.1f} ms, which alone would give "
          f"{gen['sampler_vs_generate_from_overhead']:.3f}x at this size")
    print(f"    static cache: compiled by transformers: {gen['static_compiled']}, fell back to dynamic: "
          f"{gen['static_fell_back_to_dynamic']}; first call {gen['static_first_call_s']:.2f} s "
          f"= {gen['static_first_vs_steady']:.1f}x a steady call ({gen['static_steady_call_s']:.3f} s)")
    print(f"    after an AdamW step (weights changed in place: {gen['weights_changed_in_place']}): first static call "
          f"{gen['static_after_update_s']:.3f} s = {gen['static_after_update_vs_steady']:.2f}x steady; "
          f"compiled graphs {gen['compiled_graphs']}")
    print(f"    greedy, sampler static vs plain generate: identical {gen['greedy_identical']} "
          f"({gen['greedy_identical_rows']} rows)")
    agreement = [static_path_agreement(model, tokenizer, prompts[:8], min(32, sizes["new_tokens"]), device)]
    if gen_dtype != torch.float32:                     # and the same model in fp32
        agreement.append(static_path_agreement(model.float(), tokenizer, prompts[:8], min(32, sizes["new_tokens"]),
                                               device))
        model.to(gen_dtype)
    for a in agreement:
        print(f"    static path, {a['dtype']}: greedy tokens identical to plain generate {a['greedy_identical']}; "
              f"per-token log-prob of its tokens vs a full forward: max gap {a['logprob_max_gap']:.1e} "
              f"(mean {a['logprob_mean_gap']:.1e}) nats, within {a['tolerance']:g}: {a['within_tolerance']}")
    gen["static_path_agreement"] = agreement

    # 4 -------------------------------------------------------------------------------
    it = bench_iteration(model, tokenizer, prompts, sizes["new_tokens"], sizes["pairs"], device, gen_dtype)
    print(f"\n[4] one online iteration ({it['pairs']} pairs, {it['response_tokens']} response tokens): "
          f"generate {it['generate_s']:.3f} s ({it['generate_fraction']:.0%}), label {it['label_s']:.3f} s "
          f"({it['label_fraction']:.0%}), train {it['train_s']:.3f} s ({it['train_fraction']:.0%})")

    # summary -----------------------------------------------------------------------------
    memory = steps["lean_vs_naive"]
    peak_gb = memory["lean_ckpt"]["peak_bytes"] / 1e9 if device.type == "cuda" else None
    ratios = {
        "sail_vs_dpo_time": steps["sail_vs_dpo"]["ratio"],
        "lean_vs_naive_time": memory["lean"]["time_vs_naive"],
        "lean_vs_naive_peak": memory["lean"]["peak_vs_naive"],
        "lean_ckpt_vs_naive_time": memory["lean_ckpt"]["time_vs_naive"],
        "lean_ckpt_vs_naive_peak": memory["lean_ckpt"]["peak_vs_naive"],
        "lean_ckpt_peak_gb": peak_gb,
        "sampler_dynamic_vs_generate_tokens_per_s": gen["sampler_dynamic_vs_generate"],
        "sampler_static_vs_generate_tokens_per_s": gen["sampler_static_vs_generate"],
        "static_first_vs_steady_time": gen["static_first_vs_steady"],
        "static_after_update_vs_steady_time": gen["static_after_update_vs_steady"],
        "iteration_generate_fraction": it["generate_fraction"],
        "iteration_label_fraction": it["label_fraction"],
        "iteration_train_fraction": it["train_fraction"],
    }
    print(f"\nsummary ({args.model}, {device}; targets are for qwen2-0.5b on one GPU; "
          f"peak memory on CPU is an RSS proxy):")
    print(f"    {'ratio':<42} {'measured':>9}   target")
    for name, value in ratios.items():
        shown = "n/a (CUDA)" if value is None else f"{value:9.3f}"
        print(f"    {name:<42} {shown:>9}   {TARGETS.get(name, '')}")
    print(f"    greedy tokens identical (static vs plain): {gen['greedy_identical']}; "
          f"whole benchmark {time.perf_counter() - wall:.1f} s")

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "sizes": sizes, "environment": env, "ratios": ratios,
                                        "targets": TARGETS, "steps": steps, "generation": gen, "iteration": it},
                                       indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
