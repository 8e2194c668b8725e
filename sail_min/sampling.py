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

KV cache (`cache_implementation`). None (the default) is transformers' dynamic cache, which
grows by one position per step. "static" preallocates the cache for prompt + max_new_tokens;
on CUDA, `generate` then compiles the model's forward with torch.compile (mode
"reduce-overhead", CUDA graphs). The first call pays for the compilation (tens of seconds for
a 0.5 B model). Later calls reuse it, also after in-place weight updates: an optimizer step
keeps the parameters' addresses, which is what the compiled graph reads (verified on CPU with
a forced compile; `benchmarks/bench_sail.py` measures it on CUDA). A new batch size, or a
prompt + max_new_tokens longer than any before, builds a new cache and may compile again. On
CPU transformers does not compile, and the static cache gives the same tokens as the dynamic
one. If the static path raises (a model or device it does not support), the sampler warns
once per model and uses the dynamic cache from then on. To keep the number of shapes (and so of
compilations) small while the number of online prompts varies from step to step, the static
path left-pads prompts to a multiple of 64 tokens and the batch to a power of two rows (the
extra rows are dropped); with a seed, the samples then depend on that padding, greedy ones do not.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from transformers import GenerationConfig

Prompt = str | list[dict]

# `generate` fills every option left unset from the model's generation_config.json, which for
# instruct models often truncates or reshapes the distribution (top_k, top_p, repetition
# penalty, ...). Set them all to their neutral values so that y ~ pi_theta exactly.
NEUTRAL = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)  # min_new_tokens overrides min_length
UNTRUNCATED = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, **NEUTRAL)

CACHE_IMPLEMENTATIONS = (None, "static")
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


def render_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[str]:
    """Prompt text the policy continues: chat template + generation prompt when there is one."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or message lists")
    rendered = []
    for i, prompt in enumerate(prompts):
        if tokenizer.chat_template is not None:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        elif isinstance(prompt, str):
            rendered.append(prompt)
        else:
            raise ValueError(f"prompts[{i}] is a message list, but the tokenizer has no chat template")
    return rendered


def _tokenize_prompts(tokenizer, prompts: Sequence[Prompt], pad_to_multiple_of: int | None = None):
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: set tokenizer.pad_token "
                         "(e.g. tokenizer.pad_token = tokenizer.eos_token)")
    # A chat template writes its own special tokens (BOS, ...); plain text gets the defaults.
    return tokenizer(render_prompts(tokenizer, prompts), padding=True, padding_side="left",
                     pad_to_multiple_of=pad_to_multiple_of,
                     return_tensors="pt", add_special_tokens=tokenizer.chat_template is None)


STATIC_PROMPT_BUCKET = 64   # static cache: prompts left-padded to a multiple of this many tokens


def _pad_rows_to_power_of_two(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Repeat the last row up to the next power of two: a few batch shapes, so few compilations."""
    rows = input_ids.shape[0]
    extra = (1 << (rows - 1).bit_length()) - rows
    if extra == 0:
        return input_ids, attention_mask
    return (torch.cat([input_ids, input_ids[-1:].expand(extra, -1)]),
            torch.cat([attention_mask, attention_mask[-1:].expand(extra, -1)]))


def _eos_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config adds (e.g. <|eot_id|>)."""
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids |= set(config_eos) if isinstance(config_eos, list) else ({config_eos} - {None})
    if not eos_ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an EOS token")
    return sorted(eos_ids)


def _cut_at_first_eos(generated: torch.Tensor, eos_ids: list[int], pad_id: int):
    """Mask (and set to pad) every token after the first EOS; keep the EOS itself."""
    is_eos = torch.isin(generated, torch.tensor(eos_ids, device=generated.device))
    eos_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0      # an EOS strictly earlier
    response_mask = (~eos_before).long()
    return generated.masked_fill(eos_before, pad_id), response_mask, is_eos.any(dim=1)


def generation_config(tokenizer, eos_ids: list[int], max_new_tokens: int = 64, temperature: float = 1.0,
                      greedy: bool = False, cache_implementation: str | None = None) -> GenerationConfig:
    """The settings `sample_responses` passes to `generate`, one response per input row:
    y_t ~ softmax(z_t / temperature) with no truncation, or y_t = argmax z_t when `greedy`."""
    sampling = (dict(do_sample=False, **NEUTRAL) if greedy
                else dict(do_sample=True, temperature=temperature, **UNTRUNCATED))
    return GenerationConfig(**sampling, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                            pad_token_id=tokenizer.pad_token_id, use_cache=True,
                            cache_implementation=cache_implementation)


def _generate(model, input_ids, attention_mask, config: GenerationConfig, seed: int | None):
    """`model.generate` with a forked, seeded RNG when there is a seed (global RNG untouched)."""
    device = input_ids.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)


def sample_responses(model, tokenizer, prompts: Sequence[Prompt], k: int = 2, max_new_tokens: int = 64,
                     temperature: float = 1.0, seed: int | None = None, greedy: bool = False,
                     cache_implementation: str | None = None) -> Responses:
    """Draw k responses per prompt, y ~ pi_theta(. | x); same seed, same samples.

    The model is put in eval mode (no dropout) and its training mode restored afterwards;
    the KV cache is used even when gradient checkpointing is enabled for training (HF
    checkpoints only in training mode, and `use_cache=True` is passed explicitly). With a
    seed, sampling uses a forked RNG and leaves the global RNG untouched; without one it
    draws from the global RNG.

    greedy: y_t = argmax z_t instead of sampling (temperature is then unused), so the k
        responses to a prompt are identical. For tests and benchmarks: these are not samples
        of pi_theta, which the on-policy terms of the objective need.
    cache_implementation: None (transformers' dynamic KV cache) or "static" (preallocated,
        compiled by transformers on CUDA; see the module docstring). The static path falls
        back to the dynamic one, with a warning, if it raises.
    """
    if k < 1:
        raise ValueError(f"k (responses per prompt) must be at least 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, got {cache_implementation!r}")
    device = next(model.parameters()).device
    static = cache_implementation == "static" and model not in _static_cache_failed
    batch = _tokenize_prompts(tokenizer, prompts, STATIC_PROMPT_BUCKET if static else None).to(device)
    eos_ids = _eos_token_ids(model, tokenizer)
    # Row i*k + j is sample j of prompt i: the same expansion `num_return_sequences=k` makes,
    # done here so that greedy decoding (which refuses num_return_sequences > 1) shares the path.
    input_ids = batch.input_ids.repeat_interleave(k, dim=0)
    attention_mask = batch.attention_mask.repeat_interleave(k, dim=0)
    make_config = lambda cache: generation_config(tokenizer, eos_ids, max_new_tokens, temperature,  # noqa: E731
                                                  greedy, cache)

    was_training = model.training
    model.eval()
    try:
        if static:
            try:
                padded_ids, padded_mask = _pad_rows_to_power_of_two(input_ids, attention_mask)
                sequences = _generate(model, padded_ids, padded_mask, make_config("static"), seed)[: len(input_ids)]
            except Exception as error:          # unsupported model / device: warn once, then dynamic
                _static_cache_failed.add(model)
                warnings.warn(f"static-cache generation failed for {type(model).__name__} on {device} "
                              f"({type(error).__name__}: {error}); using the dynamic cache for this model "
                              "from now on", RuntimeWarning, stacklevel=2)
                sequences = _generate(model, input_ids, attention_mask, make_config(None), seed)
        else:
            sequences = _generate(model, input_ids, attention_mask, make_config(None), seed)
    finally:
        model.train(was_training)

    prompt_length = batch.input_ids.shape[1]
    response_ids, response_mask, contains_eos = _cut_at_first_eos(
        sequences[:, prompt_length:], eos_ids, tokenizer.pad_token_id)
    texts = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
             for ids, mask in zip(response_ids, response_mask)]
    return Responses(
        prompts=[prompt for prompt in prompts for _ in range(k)],
        prompt_ids=input_ids, prompt_mask=attention_mask,
        response_ids=response_ids, response_mask=response_mask, texts=texts,
        contains_eos=contains_eos, lengths=response_mask.sum(dim=1))


def _response_text(response, index: int) -> str:
    """A response as text: a string, or a conversational dataset's [one assistant message]."""
    if isinstance(response, str):
        return response
    if len(response) == 1 and response[0].get("role") == "assistant":
        return response[0]["content"]
    raise ValueError(f"responses[{index}] must be text or a list of one assistant message")


def encode_responses(tokenizer, prompts: Sequence[Prompt], responses: Sequence) -> Responses:
    """Given (prompt, response) rows, e.g. a dataset's chosen answers, in the same layout as
    sampled ones (CPU tensors): the response is tokenised on its own and closed with the EOS.
    Responses are text, or [{"role": "assistant", "content": ...}] as in conversational data."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses differ in length: {len(prompts)} vs {len(responses)}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token to close the responses with")
    responses = [_response_text(response, i) for i, response in enumerate(responses)]
    batch = _tokenize_prompts(tokenizer, prompts)
    response_token_lists = [tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                            for text in responses]
    lengths = torch.tensor([len(ids) for ids in response_token_lists])
    response_ids = torch.full((len(responses), int(lengths.max())), tokenizer.pad_token_id)
    for row, ids in enumerate(response_token_lists):
        response_ids[row, :len(ids)] = torch.tensor(ids)
    response_mask = (torch.arange(response_ids.shape[1]) < lengths.unsqueeze(1)).long()
    return Responses(
        prompts=list(prompts), prompt_ids=batch.input_ids, prompt_mask=batch.attention_mask,
        response_ids=response_ids, response_mask=response_mask, texts=list(responses),
        contains_eos=torch.ones(len(responses), dtype=torch.bool), lengths=lengths)
