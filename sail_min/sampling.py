"""Sample k responses per prompt from the policy, with the bookkeeping that the losses need.

For each prompt x the policy draws k responses, token by token,

    y^(j) ~ pi_theta(. | x),   y_t ~ softmax(z_t / tau),   j = 1..k,

with temperature tau = 1 and no top-k / top-p / min-p truncation or repetition penalty (whatever
the model's own generation config says), so that the samples come from pi_theta itself: the
distribution whose log-probabilities l_theta(y|x) the on-policy objectives use.

A `Responses` batch has one row per (prompt, response); row i*k + j is sample j of
prompt i, so for k = 2 the pairs are rows (0, 1), (2, 3), ...:

    prompt_ids    [B, P]   left-padded    pad pad x_1 x_2 x_3
    response_ids  [B, R]   right-padded   y_1 y_2 eos pad pad

so prompt_ids ++ response_ids is one contiguous sequence per row, ready for
`sequence_logprobs(model, **responses.model_inputs())`.

End of a response: the first EOS. The EOS is kept (stopping is one of the policy's
decisions and is scored like any token); everything after it is masked and set to pad.
Masks come from the EOS position, never from `ids != pad_token_id`, which drops the EOS
itself when pad == eos. `contains_eos` records whether the response stopped before
`max_new_tokens`; `lengths` counts response tokens including the EOS.

Prompts are plain strings or message lists [{"role", "content"}]. When the tokenizer has a
chat template it is applied (a plain string becomes one user message) with the generation
prompt; otherwise a plain string is used as it is.

Prompt length. `truncate_prompts_left` cuts over-long prompts from the left (oldest turns of a
conversation first, the chat template never cut), so the end of the prompt, the part the response
answers, is kept. The loop applies it to every prompt it samples for: training, evaluation and
the reference's samples.

KV cache (`cache`, SAILConfig's `generation_cache`). "dynamic" (the default) is transformers' dynamic cache, which
grows by one position per step. "static" preallocates the cache for prompt + max_new_tokens;
on CUDA, `generate` then compiles the model's forward with torch.compile (`compile`:
"cudagraphs" = mode "reduce-overhead", transformers' default; "no-cudagraphs" = mode "default";
"off" = no compilation). The first call of a new shape pays for the compilation (tens of seconds
for a 0.5 B model); later calls reuse it, also after in-place weight updates (an optimizer step
keeps the parameters' addresses, which is what the compiled graph reads). On CPU transformers
does not compile, and the static cache gives the same tokens as the dynamic one. If the static
path raises (a model or device it does not support), the sampler warns once per model and uses
the dynamic cache from then on (`static_cache_failed(model)` says whether it did).

Shapes. Every new (rows, prompt length) compiles again, so the static path pads: to exactly
`batch_rows` rows (the last row repeated, the copies dropped afterwards) and `prompt_length`
prompt tokens (left padding) when given, else to the next power of two rows and the next multiple
of 64 tokens. With `prompt_length` (fixed shapes: the loop's training sampler pads to 2 x pairs_per_step
rows, its evaluation sampler to eval_prompts rows, both to max_prompt_tokens) the graphs are compiled with
`dynamic=False`: one static graph per call site, where transformers' default (`dynamic=None`) would let
dynamo recompile the second shape as a graph with a symbolic batch size. With a seed the samples then depend on that padding; greedy ones do not. Prompt
columns that are padding in every returned row are dropped afterwards, so the log-prob passes
never pay for the generation's padding.

CUDA graphs (`isolate`, default on). A graph replay writes its outputs into the same buffers every
time, so a tensor that still points into them after `generate` can change under the training step
that reads it. The sampler copies what `generate` returns and marks a new CUDA-graph step
(`torch.compiler.cudagraph_mark_step_begin`) before returning; with `isolate=False` it does not
(for diagnosis: `benchmarks/bench_loop.py` compares both on a GPU).
"""
from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields

import torch
from transformers import CompileConfig, GenerationConfig

try:
    from .logprobs import eval_mode         # every module's mode set directly: no re-kernelisation
except ImportError:                         # this file copied alone: the plain switch (slower)
    @contextmanager
    def eval_mode(model):
        """``model.eval()`` inside the block, the model's mode restored on exit."""
        training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(training)

Prompt = str | list[dict]

# `generate` fills every option left unset (None) from the model's generation_config.json, which
# for instruct models often truncates or reshapes the distribution (top_k, top_p, repetition
# penalty, ...). Set them to their neutral values so that y ~ pi_theta exactly. min_p and
# min_new_tokens are the exceptions: any value, 0 included, adds a processor that runs at every
# token (min_p sorts the whole vocabulary; min_new_tokens=0 becomes min_length = prompt length,
# a no-op that costs ~4% of a tiny model's decoding step), so each is set (to 0) only when the
# model's own config sets it (`generation_config`).
NEUTRAL = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0)
UNTRUNCATED = dict(top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, **NEUTRAL)

CACHES = ("dynamic", "static")             # SAILConfig.generation_cache; "dynamic" = transformers' None
COMPILE_MODES = {                          # generation_compile -> transformers' CompileConfig arguments
    "cudagraphs": dict(mode="reduce-overhead"),               # transformers' default: inductor + CUDA graphs
    "no-cudagraphs": dict(mode="default"),                    # inductor, no CUDA graphs
    "eager-backend": dict(backend="eager", mode=None),        # dynamo's tracing and guards only, any device
    "off": None,
}
STATIC_PROMPT_BUCKET = 64   # static cache, no prompt_length given: prompts padded to a multiple of this
_static_cache_failed = weakref.WeakSet()   # models whose static-cache `generate` raised: dynamic from then on


@dataclass
class Responses:
    """k responses per prompt, one row each (row i*k + j: sample j of prompt i)."""

    prompts: list            # the prompt of each row, as given (str or message list)
    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] long, 1 on prompt tokens
    response_ids: torch.Tensor  # [B, R] long, right-padded, pad after the first EOS
    response_mask: torch.Tensor  # [B, R] long, 1 on response tokens up to and including the first EOS
    texts: list[str]          # decoded responses, special tokens skipped
    contains_eos: torch.Tensor  # [B] bool: the response ended with an EOS
    lengths: torch.Tensor     # [B] long: response tokens, EOS included

    def __len__(self) -> int:
        return len(self.texts)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """input_ids = prompt ++ response, attention_mask, and response_mask (response tokens only)."""
        return {
            "input_ids": torch.cat([self.prompt_ids, self.response_ids], dim=1),
            "attention_mask": torch.cat([self.prompt_mask, self.response_mask], dim=1),
            "response_mask": torch.cat([torch.zeros_like(self.prompt_mask), self.response_mask], dim=1),
        }

    def select(self, rows) -> "Responses":
        """The given rows (a slice, list or index tensor), e.g. `select(slice(0, None, 2))` for
        the first response of every pair when k = 2."""
        index = torch.arange(len(self))[rows]
        picked = {}
        for field in fields(self):
            value = getattr(self, field.name)
            picked[field.name] = value[index] if isinstance(value, torch.Tensor) else [value[i] for i in index]
        return Responses(**picked)

    @staticmethod
    def cat(batches: Sequence["Responses"], pad_token_id: int) -> "Responses":
        """Rows of several batches in one (prompts re-padded on the left, responses on the right)."""
        batches = [b for b in batches if b is not None and len(b)]
        if len(batches) == 1:
            return batches[0]
        prompt_width = max(b.prompt_ids.shape[1] for b in batches)
        response_width = max(b.response_ids.shape[1] for b in batches)
        left = lambda t, value: torch.nn.functional.pad(t, (prompt_width - t.shape[1], 0), value=value)     # noqa: E731
        right = lambda t, value: torch.nn.functional.pad(t, (0, response_width - t.shape[1]), value=value)  # noqa: E731
        return Responses(
            prompts=[p for b in batches for p in b.prompts],
            prompt_ids=torch.cat([left(b.prompt_ids.cpu(), pad_token_id) for b in batches]),
            prompt_mask=torch.cat([left(b.prompt_mask.cpu(), 0) for b in batches]),
            response_ids=torch.cat([right(b.response_ids.cpu(), pad_token_id) for b in batches]),
            response_mask=torch.cat([right(b.response_mask.cpu(), 0) for b in batches]),
            texts=[t for b in batches for t in b.texts],
            contains_eos=torch.cat([b.contains_eos.cpu() for b in batches]),
            lengths=torch.cat([b.lengths.cpu() for b in batches]))


# --------------------------------------------------------------------------------------
# prompts: the text the policy continues, and cutting it to max_prompt_tokens
# --------------------------------------------------------------------------------------
PROMPT_FORMATS = ("chat", "text")


def _render(tokenizer, prompt: Prompt, prompt_format: str = "chat", index: int = 0) -> tuple[str, bool]:
    """(text the policy continues, whether the tokenizer adds its special tokens to it)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if isinstance(prompt, str) and (tokenizer.chat_template is None or prompt_format == "text"):
        return prompt, True                        # plain text, with the tokenizer's BOS etc.
    if tokenizer.chat_template is None:
        raise ValueError(f"prompts[{index}] is a message list, but the tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    # a chat template writes its own special tokens
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


def render_prompts(tokenizer, prompts: Sequence[Prompt], prompt_format: str = "chat") -> list[str]:
    """Prompt text the policy continues: chat template + generation prompt when there is one.

    A plain-text prompt meets a chat template as one user message (``prompt_format="chat"``, the
    default here) or stays as it is (``"text"``, what TRL does). Message lists always use the template."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or message lists")
    return [_render(tokenizer, prompt, prompt_format, i)[0] for i, prompt in enumerate(prompts)]


def _prompt_ids(tokenizer, prompt: Prompt, prompt_format: str = "chat", index: int = 0) -> list[int]:
    """Token ids of a prompt as the policy reads it (``_render``). Remembered per (tokenizer, its vocabulary size
    and chat template, prompt): a step measures its prompts for truncation, then encodes them for sampling or
    scoring, and online prompts recur across steps; each is rendered and tokenised once."""
    try:
        key = prompt if isinstance(prompt, str) else tuple(tuple(sorted(message.items())) for message in prompt)
        return list(_remembered_prompt_ids(tokenizer, len(tokenizer), tokenizer.chat_template, prompt_format, key))
    except (TypeError, ValueError):     # unhashable (e.g. multimodal content), or bad input: named with its index
        text, special = _render(tokenizer, prompt, prompt_format, index)
        return tokenizer(text, add_special_tokens=special).input_ids


@functools.lru_cache(maxsize=4096)
def _remembered_prompt_ids(tokenizer, vocabulary_size: int, chat_template, prompt_format: str, key) -> tuple[int, ...]:
    prompt = key if isinstance(key, str) else [dict(items) for items in key]
    text, special = _render(tokenizer, prompt, prompt_format)
    return tuple(tokenizer(text, add_special_tokens=special).input_ids)


def prompt_length(tokenizer, prompt: Prompt, prompt_format: str = "chat") -> int:
    """Tokens of a prompt as the policy reads it: chat template and generation prompt included."""
    return len(_prompt_ids(tokenizer, prompt, prompt_format))


def truncate_prompts_left(tokenizer, prompts: Sequence[Prompt], max_tokens: int,
                          prompt_format: str = "chat") -> tuple[list, int]:
    """Cut over-long prompts from the left; return (prompts, how many were cut).

    Without a chat template, plain text keeps its last ``max_tokens`` tokens. Otherwise a prompt
    (a string becomes one user message) is measured as the policy reads it, template included:
    its oldest non-system messages are dropped while more than one remains, then the first
    remaining non-system message loses tokens from its start until the whole fits (the template's
    own tokens are never cut).
    """
    out, cut = [], 0
    for prompt in prompts:
        if prompt_length(tokenizer, prompt, prompt_format) > max_tokens:
            cut += 1
            if isinstance(prompt, str) and (tokenizer.chat_template is None or prompt_format == "text"):
                # plain text: keep the last tokens; BOS etc. still added
                keep = max_tokens - len(tokenizer("", add_special_tokens=True).input_ids)
                if keep < 1:
                    raise ValueError(f"max_prompt_tokens={max_tokens} leaves no room for the prompt "
                                     "next to the tokenizer's special tokens; raise max_prompt_tokens")
                prompt = tokenizer.decode(tokenizer(prompt, add_special_tokens=False).input_ids[-keep:])
            elif isinstance(prompt, str):            # the sampler wraps it as one user message
                prompt = _truncate_conversation(tokenizer, [{"role": "user", "content": prompt}],
                                                max_tokens)[0]["content"]
            else:
                prompt = _truncate_conversation(tokenizer, prompt, max_tokens)
        out.append(prompt)
    return out, cut


def _truncate_conversation(tokenizer, messages: list[dict], max_tokens: int) -> list[dict]:
    messages = [dict(m) for m in messages]
    body = [i for i, m in enumerate(messages) if m["role"] != "system"]
    while len(body) > 1 and prompt_length(tokenizer, messages) > max_tokens:   # drop the oldest turns,
        del messages[body[0]]                                                    # never starting with
        body = [i for i, m in enumerate(messages) if m["role"] != "system"]      # an assistant turn
        while len(body) > 1 and messages[body[0]]["role"] == "assistant":
            del messages[body[0]]
            body = [i for i, m in enumerate(messages) if m["role"] != "system"]
    first = body[0]
    for _ in range(8):                         # re-tokenising can merge tokens: a few rounds at most
        overflow = prompt_length(tokenizer, messages) - max_tokens
        if overflow <= 0:
            return messages
        ids = tokenizer(messages[first]["content"], add_special_tokens=False).input_ids
        if overflow >= len(ids):
            raise ValueError(f"max_prompt_tokens={max_tokens} is shorter than the chat template's own "
                             f"tokens for this prompt; raise max_prompt_tokens")
        messages[first]["content"] = tokenizer.decode(ids[overflow:])
    return messages


def check_positions(model, max_prompt_tokens: int, max_new_tokens: int) -> None:
    """A clear error when prompt + response can exceed the positions the model was built for."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and max_prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens} + {max_new_tokens} exceeds "
                         f"the policy's {limit} positions (max_position_embeddings); lower one of them")


# --------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------
def _tokenize_prompts(tokenizer, prompts: Sequence[Prompt], pad_to_multiple_of: int | None = None,
                      length: int | None = None, prompt_format: str = "chat") -> dict[str, torch.Tensor]:
    """input_ids and attention_mask [B, P], left-padded (to a multiple, or to exactly `length`)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: set tokenizer.pad_token "
                         "(e.g. tokenizer.pad_token = tokenizer.eos_token)")
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or message lists")
    rows, ids_of = [], {}                  # a prompt given twice (y1 and y2 of a pair) is tokenised once
    for i, prompt in enumerate(prompts):
        if id(prompt) not in ids_of:
            ids_of[id(prompt)] = _prompt_ids(tokenizer, prompt, prompt_format, i)
        rows.append(ids_of[id(prompt)])
    width = max(len(ids) for ids in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    if length is not None:
        if width > length:
            raise ValueError(f"a prompt has {width} tokens, more than prompt_length={length}: "
                             "truncate prompts first (truncate_prompts_left)")
        width = length
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        if ids:
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention_mask[i, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _pad_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: int | None):
    """Repeat the last row up to `rows` (default: the next power of two): few batch shapes."""
    have = input_ids.shape[0]
    rows = (1 << (have - 1).bit_length()) if rows is None else rows
    if rows < have:
        raise ValueError(f"batch_rows={rows} is smaller than the {have} rows to generate")
    extra = rows - have
    return (torch.cat([input_ids, input_ids[-1:].expand(extra, -1)]),
            torch.cat([attention_mask, attention_mask[-1:].expand(extra, -1)]))


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config adds (e.g. <|eot_id|>)."""
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids |= set(config_eos) if isinstance(config_eos, list) else ({config_eos} - {None})
    if not eos_ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an EOS token")
    return sorted(eos_ids)


def cut_at_first_eos(generated: torch.Tensor, eos_ids: list[int], pad_id: int):
    """(ids, response_mask, contains_eos): every token after the first EOS masked and set to pad;
    the EOS itself kept."""
    is_eos = torch.isin(generated, torch.tensor(eos_ids, device=generated.device))
    eos_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0      # an EOS strictly earlier
    response_mask = (~eos_before).long()
    return generated.masked_fill(eos_before, pad_id), response_mask, is_eos.any(dim=1)


def generation_config(tokenizer, eos_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                      greedy: bool = False, cache_implementation: str | None = None, compile: str = "cudagraphs",
                      model=None, max_cache_len: int | None = None) -> GenerationConfig:
    """The settings `sample_responses` passes to `generate`, one response per input row:
    y_t ~ softmax(z_t / temperature) with no truncation, or y_t = argmax z_t when `greedy`."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {tuple(COMPILE_MODES)}, got {compile!r}")
    sampling = (dict(do_sample=False, **NEUTRAL) if greedy
                else dict(do_sample=True, temperature=temperature, **UNTRUNCATED))
    if not greedy and model is not None and getattr(model.generation_config, "min_p", None) is not None:
        sampling["min_p"] = 0.0                     # the model's config sets min_p: neutralise it
    if model is not None and getattr(model.generation_config, "min_new_tokens", None) is not None:
        sampling["min_new_tokens"] = 0              # ... or min_new_tokens, which overrides min_length
        del sampling["min_length"]
    on_cpu = model is not None and next(model.parameters()).device.type == "cpu"   # transformers compiles on GPUs only
    compiled = dict(disable_compile=True) if not COMPILE_MODES[compile] else \
        {} if on_cpu and compile != "eager-backend" else \
        dict(compile_config=_compile_config(compile, static_shapes=max_cache_len is not None))
    return GenerationConfig(**sampling, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                            pad_token_id=tokenizer.pad_token_id, use_cache=True,
                            cache_implementation=cache_implementation,
                            **(dict(compiled, max_cache_len=max_cache_len) if cache_implementation == "static" else {}))


def _compile_config(compile: str, static_shapes: bool = False) -> CompileConfig:
    """transformers' CompileConfig for `compile`. ``static_shapes`` (fixed shapes: the caller pads every call to
    one shape per call site): ``dynamic=False``, one static graph per shape. Left at transformers' ``None``,
    dynamo's automatic-dynamic rule recompiles the second shape it meets (evaluation's rows after training's)
    as a graph with a symbolic batch size, which every later call of either shape then runs, and whose CUDA
    graphs are recorded per size."""
    config = CompileConfig(**COMPILE_MODES[compile], **(dict(dynamic=False) if static_shapes else {}))
    if compile == "eager-backend":        # also on a CPU: counts (re)compilations where nothing else compiles
        config._compile_all_devices = True  # transformers' own switch for that (its tests use it)
    return config


def static_cache_failed(model) -> bool:
    """Whether the static-cache path raised for this model (the sampler then uses the dynamic one)."""
    return model in _static_cache_failed


def compile_stats() -> dict:
    """torch.compile's counters for this process: graphs built so far and seconds spent compiling."""
    if "torch._dynamo.utils" not in sys.modules:       # nothing compiled yet (and its import costs ~1 s)
        return {"graphs": 0, "seconds": 0.0}
    from torch._dynamo.utils import compilation_time_metrics, counters
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "seconds": float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))}


@contextmanager
def input_grad_hooks_off(model):
    """transformers' ``enable_input_require_grads`` hooks removed inside, put back on exit.

    Gradient checkpointing on a model with frozen embeddings (an adapter model) registers a forward hook on the
    input embeddings that calls ``output.requires_grad_(True)``, so that gradients reach the checkpointed layers.
    Under ``generate`` (no grad) it does nothing useful, and torch.compile cannot trace it (dynamo of torch 2.11,
    measured on an H200: "Unsupported Tensor.requires_grad_() call"): every compiled shape then splits into two
    graphs, and a run's two sampling shapes compile four."""
    owners = [m for m in model.modules() if vars(m).get("_require_grads_hooks") or vars(m).get("_require_grads_hook")]
    for owner in owners:
        owner.disable_input_require_grads()
    try:
        yield
    finally:
        for owner in owners:
            owner.enable_input_require_grads()


def static_cache_precision(model, device: torch.device) -> AbstractContextManager:
    """Autocast off for the static path when its dtype is not the weights' (fp32 weights under fp16 autocast: a
    T4's path), else nothing. The static cache takes its dtype from the prefill's keys, which the rotary
    embedding upcasts to the weights' fp32, while the compiled decoding steps write fp16 keys into it: transformers
    5.17 then raises "index_copy_(): self and source expected to have the same dtype" (measured on an H200 and on
    a CPU) and the sampler fell back to the slow dynamic cache. Decoding reads every weight once per token, so
    fp32 weights without autocast cost no more than with it (autocast adds a cast of each weight)."""
    dtype = getattr(model, "dtype", None)
    if (device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type) and dtype is not None
            and torch.get_autocast_dtype(device.type) != dtype):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def manual_seed(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for work on ``device``. On a CPU only the CPU's generator: torch.manual_seed
    also queues a seed for each accelerator type not yet initialised (CUDA, XPU, MTIA), recording a stack trace
    for each, ~0.5 ms per call deep in a training loop."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _generate(model, input_ids, attention_mask, config: GenerationConfig, seed: int | None, synced_gpus: bool,
              inference_mode: bool = False):
    """`model.generate` with a forked, seeded RNG when there is a seed (global RNG untouched).

    ``inference_mode``: under ``torch.inference_mode`` rather than generate's own ``no_grad`` (no autograd
    bookkeeping at all: 8% less CPU time per call on the tiny model, the same tokens); the result is then an
    inference tensor, which the caller copies before anything may save it for backward."""
    device = input_ids.device
    synced = dict(synced_gpus=True) if synced_gpus else {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None), \
            torch.inference_mode(inference_mode):
        if seed is not None:
            manual_seed(seed, device)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **synced)


JOIN_PROMPT = "Hello."
"""The throw-away prompt of a process that joins the others' sharded generation without prompts of its own."""


@dataclass
class Sampler:
    """``sampler(model, prompts, k, seed)``: k responses per prompt, y ~ pi(. | x), with one set of settings.

    The loop builds one per call site from its config (``runtime.Runtime.sampler``): training samples,
    evaluation samples, the reference's samples. Fields are ``sample_responses``' arguments; ``rows`` and
    ``prompt_length`` fix the static cache's shape (one shape, one compilation), and ``precision`` is a
    context (e.g. autocast) that generation runs in."""

    tokenizer: object
    max_new_tokens: int
    temperature: float
    prompt_format: str
    cache: str                                  # "dynamic" | "static"
    compile: str                                # static cache: "cudagraphs" | "no-cudagraphs" | "eager-backend" | "off"
    isolate: bool                               # copy generate's output, start a new CUDA-graph step
    rows: int | None = None                     # static, fixed shapes: every call padded to this many rows...
    prompt_length: int | None = None            # ...and this many prompt tokens
    synced_gpus: bool = False                   # sharded weights: every process steps until all are done
    precision: Callable[[], AbstractContextManager] = nullcontext

    def __call__(self, model, prompts: Sequence[Prompt], k: int, seed: int | None) -> "Responses | None":
        """k responses per prompt; no prompts: None. With sharded weights (``synced_gpus``) a process without
        prompts of its own still steps through the other processes' generation (their forward passes gather
        weights from it) with one throw-away sample; so call it on every process whenever any process samples."""
        if not prompts:
            if self.synced_gpus:
                self(model, [JOIN_PROMPT], k=1, seed=seed)
            return None
        with self.precision():
            return sample_responses(model, self.tokenizer, prompts, k=k, max_new_tokens=self.max_new_tokens,
                                    temperature=self.temperature, seed=seed, cache=self.cache,
                                    compile=self.compile, isolate=self.isolate, batch_rows=self.rows,
                                    prompt_format=self.prompt_format, prompt_length=self.prompt_length,
                                    synced_gpus=self.synced_gpus)


def sample_responses(model, tokenizer, prompts: Sequence[Prompt], k: int = 2, *, max_new_tokens: int,
                     temperature: float = 1.0, seed: int | None = None, greedy: bool = False,
                     cache: str = "dynamic", compile: str = "cudagraphs",
                     batch_rows: int | None = None, prompt_length: int | None = None,
                     isolate: bool = True, prompt_format: str = "chat", synced_gpus: bool = False) -> Responses:
    """Draw k responses per prompt, y ~ pi_theta(. | x); same seed, same samples.

    The model is put in eval mode (no dropout) and its training mode restored afterwards;
    the KV cache is used even when gradient checkpointing is enabled for training (HF
    checkpoints only in training mode, and `use_cache=True` is passed explicitly). With a
    seed, sampling uses a forked RNG and leaves the global RNG untouched; without one it
    draws from the global RNG.

    greedy: y_t = argmax z_t instead of sampling (temperature is then unused), so the k
        responses to a prompt are identical. For tests and benchmarks: these are not samples
        of pi_theta, which the on-policy terms of the objective need.
    cache: "dynamic" (transformers' dynamic KV cache) or "static" (preallocated,
        compiled by transformers on CUDA; see the module docstring), with `compile` one of
        "cudagraphs", "no-cudagraphs", "eager-backend" (torch.compile's eager backend, on a CPU too: how the
        tests count compilations) or "off". The static path falls back to the dynamic one,
        with a warning, if it raises.
    batch_rows, prompt_length: static cache only, the exact shape to pad to (k * len(prompts)
        rows at most; prompts of at most prompt_length tokens, a cache of prompt_length +
        max_new_tokens positions): one shape, one compilation.
    isolate: copy generate's output and mark a new CUDA-graph step (see the module docstring).
    prompt_format: "chat" (a plain-text prompt becomes one user message of the chat template) or
        "text" (it stays text, as in TRL); see `render_prompts`.
    synced_gpus: sharded weights (FSDP2): every forward pass gathers them from all processes, so every
        process must run as many as the others; a process that has finished keeps stepping until all are.
    """
    if k < 1:
        raise ValueError(f"k (responses per prompt) must be at least 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    device = next(model.parameters()).device
    static = cache == "static" and model not in _static_cache_failed
    batch = _tokenize_prompts(tokenizer, prompts, None if (not static or prompt_length) else STATIC_PROMPT_BUCKET,
                              prompt_length if static else None, prompt_format)
    batch = {key: value.to(device) for key, value in batch.items()}
    eos_ids = eos_token_ids(model, tokenizer)
    # Row i*k + j is sample j of prompt i: the same expansion `num_return_sequences=k` makes,
    # done here so that greedy decoding (which refuses num_return_sequences > 1) shares the path.
    input_ids = batch["input_ids"].repeat_interleave(k, dim=0)
    attention_mask = batch["attention_mask"].repeat_interleave(k, dim=0)
    make_config = lambda cache: generation_config(tokenizer, eos_ids, max_new_tokens, temperature,  # noqa: E731
                                                  greedy, cache, compile, model,
                                                  prompt_length and prompt_length + max_new_tokens)

    if static:                                  # a bad batch_rows is the caller's error, not a fallback
        padded_ids, padded_mask = _pad_rows(input_ids, attention_mask, batch_rows)
    with eval_mode(model):                      # no dropout; each module's mode restored after
        if static:
            try:
                with input_grad_hooks_off(model), static_cache_precision(model, device):
                    sequences = _generate(model, padded_ids, padded_mask, make_config("static"), seed,
                                          synced_gpus)[: len(input_ids)]
            except Exception as error:          # unsupported model / device: warn once, then dynamic
                _static_cache_failed.add(model)
                warnings.warn(f"static-cache generation failed for {type(model).__name__} on {device} "
                              f"({type(error).__name__}: {error}); using the dynamic cache for this model "
                              "from now on", RuntimeWarning, stacklevel=2)
                sequences = _generate(model, input_ids, attention_mask, make_config(None), seed, synced_gpus)
        else:                    # inference mode, except with sharded weights (FSDP2 would gather into its tensors)
            sequences = _generate(model, input_ids, attention_mask, make_config(None), seed, synced_gpus,
                                  inference_mode=not synced_gpus)
    if isolate or sequences.is_inference():
        sequences = sequences.clone()               # nothing returned points into a graph's buffers; a normal tensor
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    prompt_width = batch["input_ids"].shape[1]
    response_ids, response_mask, contains_eos = cut_at_first_eos(
        sequences[:, prompt_width:], eos_ids, tokenizer.pad_token_id)
    first_real = int(attention_mask.any(dim=0).nonzero()[0]) if attention_mask.any() else 0
    lengths = response_mask.sum(dim=1)                 # the mask is a prefix: tokens up to the first EOS
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(response_ids.tolist(), lengths.tolist())],
                                   skip_special_tokens=True)
    return Responses(
        prompts=[prompt for prompt in prompts for _ in range(k)],
        prompt_ids=input_ids[:, first_real:], prompt_mask=attention_mask[:, first_real:],   # no all-pad columns
        response_ids=response_ids, response_mask=response_mask, texts=texts,
        contains_eos=contains_eos, lengths=lengths)


def _response_text(response, index: int) -> str:
    """A response as text: a string, or a conversational dataset's [one assistant message]."""
    if isinstance(response, str):
        return response
    if len(response) == 1 and response[0].get("role") == "assistant":
        return response[0]["content"]
    raise ValueError(f"responses[{index}] must be text or a list of one assistant message")


def encode_responses(tokenizer, prompts: Sequence[Prompt], responses: Sequence, prompt_format: str = "chat",
                     max_tokens: int | None = None) -> Responses:
    """Given (prompt, response) rows, e.g. a dataset's chosen answers, in the same layout as
    sampled ones (CPU tensors): the response is tokenised on its own and closed with the EOS
    (appended only when the text does not already end with it, as TRL does).
    Responses are text, or [{"role": "assistant", "content": ...}] as in conversational data.

    ``max_tokens``: a response longer than this, EOS included, keeps its first ``max_tokens`` tokens
    and no EOS (``contains_eos`` False, its text decoded from the kept tokens), like a sample cut at
    max_new_tokens; ``(~contains_eos).sum()`` counts the cut rows. None keeps every response whole."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses differ in length: {len(prompts)} vs {len(responses)}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token to close the responses with")
    responses = [_response_text(response, i) for i, response in enumerate(responses)]
    batch = _tokenize_prompts(tokenizer, prompts, prompt_format=prompt_format)
    eos = tokenizer.eos_token_id
    response_token_lists = tokenizer(responses, add_special_tokens=False).input_ids      # one call for the batch
    response_token_lists = [ids if ids[-1:] == [eos] else ids + [eos] for ids in response_token_lists]
    cut = [max_tokens is not None and len(ids) > max_tokens for ids in response_token_lists]
    for row in (row for row, is_cut in enumerate(cut) if is_cut):
        response_token_lists[row] = response_token_lists[row][:max_tokens]
        responses[row] = tokenizer.decode(response_token_lists[row])
    lengths = torch.tensor([len(ids) for ids in response_token_lists])
    response_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(ids, dtype=torch.long) for ids in response_token_lists],
                                                   batch_first=True, padding_value=tokenizer.pad_token_id)
    response_mask = (torch.arange(response_ids.shape[1]) < lengths.unsqueeze(1)).long()
    return Responses(
        prompts=list(prompts), prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"],
        response_ids=response_ids, response_mask=response_mask, texts=list(responses),
        contains_eos=~torch.tensor(cut, dtype=torch.bool), lengths=lengths)
