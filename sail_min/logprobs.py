"""Sequence log-probabilities of responses under a causal LM, and the frozen reference model.

For a prompt x and a response y = (y_1, ..., y_T) the sequence log-probability is the SUM

    l_theta(y|x) = sum_{t=1..T} log pi_theta(y_t | x, y_<t)

(not the mean: DPO, SAIL and TRL all sum, and the implicit reward
h_theta = l_theta - l_ref is only a log-ratio of sequence probabilities with the sum).

Each token's log-probability comes from the logits z_t = W h_{t-1} (h: the final hidden
state one position earlier, W: the lm_head):

    log pi_theta(y_t | x, y_<t) = z_t[y_t] - logsumexp_v z_t[v]

The naive way materialises log_softmax over the whole [batch, length, vocab] logits in fp32:
16 x 512 x 151,936 x 4 bytes = 5 GB, plus as much again for its gradient. Here only the
response positions are kept (prompt and padding positions never reach the lm_head), packed
into one list of N response tokens, and their logits exist for one chunk of `chunk_size`
tokens at a time: each chunk is reduced at once to the two numbers above, z_t[y_t] and
logsumexp z_t, and dropped. `torch.utils.checkpoint` recomputes a chunk's logits during
backward, so the gradient is exact and only one chunk's logits are alive at any time:
chunk_size x vocab x 4 bytes (512 x 151,936 x 4 = 0.3 GB; backward holds about four
such buffers: the logits, their exponentials and two gradients). When the logits of all
the batch's response tokens take at most 16 MiB (`KEEP_LOGITS_BYTES`: the tiny models of
this project), autograd keeps them instead: recomputing would save next to no memory and
costs a second lm_head pass plus checkpoint's bookkeeping (~1 ms a step on the tiny model).

Batches are one row per (prompt, response): input_ids = prompt ++ response, with any
padding on either side. Three [B, L] tensors describe them:

    input_ids       token ids
    attention_mask  1 on real tokens (prompt and response), 0 on padding
    response_mask   1 on response tokens only: the tokens that l(y|x) sums over

Position ids are counted over real tokens only, p_t = (sum_{s<=t} mask_s) - 1, so a
left-padded row gets exactly the positions it would have alone (as in `generate`).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from copy import deepcopy

import torch
from torch.utils.checkpoint import checkpoint

KEEP_LOGITS_BYTES = 16 * 2**20      # sequence_logprobs(recompute=None) keeps fp32 logits up to this size


def _chunk_token_logprobs(lm_head: torch.nn.Module, hidden: torch.Tensor,
                          targets: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | ...) = z_t[y_t] - logsumexp_v z_t[v] for a chunk of tokens, z = lm_head(h).

    The logits come out of lm_head in the model's (or autocast's) dtype and are upcast to fp32
    before the gather and the logsumexp; under bf16 autocast the per-sequence sums then differ
    from an fp32 computation by round-off of the bf16 matmul (~1e-2 nats on the tiny model)."""
    logits = lm_head(hidden).float()                                      # z: [chunk, V], this chunk only
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # z_t[y_t]
    return target_logits - logits.logsumexp(dim=-1)                      # z_t[y_t] - logsumexp z_t


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, chunk_size: int = 512,
                      engine: torch.nn.Module | None = None, recompute: bool | None = None) -> torch.Tensor:
    """l(y|x) = sum_t log pi(y_t | x, y_<t) over response tokens, one value per row, shape [B].

    Differentiable (wrap the reference model's call in torch.no_grad()). Logits are
    materialised for `chunk_size` response tokens at a time; the result does not depend on it.
    ``recompute``: whether backward recomputes each chunk's logits (True) or autograd keeps them (False);
    None: recompute when the response tokens' fp32 logits, N x vocab x 4 bytes, exceed KEEP_LOGITS_BYTES.
    The values and gradients are the same either way.
    ``engine``: a module whose forward must run for ``model``'s weights to be there and its gradients
    averaged (a DDP wrapper, or the FSDP2-sharded model itself; ``runtime.Runtime.engine_for`` says which);
    None for a plain model.
    """
    if not (input_ids.shape == attention_mask.shape == response_mask.shape) or input_ids.dim() != 2:
        raise ValueError(f"input_ids, attention_mask and response_mask must share one [batch, length] "
                         f"shape, got {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, "
                         f"{tuple(response_mask.shape)}")
    if bool((response_mask.bool() & ~attention_mask.bool()).any()):
        raise ValueError("response_mask marks tokens that attention_mask marks as padding")
    if bool(response_mask[:, 0].any()):
        raise ValueError("response_mask marks the first position: a response needs at least one "
                         "prompt token before it to be predicted from")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    config = model.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise NotImplementedError(f"{type(model).__name__} transforms its logits after the lm_head "
                                  "(soft-capping or scaling); sequence_logprobs assumes z = lm_head(h)")

    if recompute is None:                                         # N x V x 4 bytes of logits: worth recomputing?
        recompute = int(response_mask[:, 1:].sum()) * config.vocab_size * 4 > KEEP_LOGITS_BYTES
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)   # p_t over real tokens
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if engine is None:                                           # a plain model: the decoder, then the chunks
        hidden = model.get_decoder()(**inputs).last_hidden_state
        return _response_logprobs(model.get_output_embeddings(), hidden, input_ids, response_mask, chunk_size,
                                  recompute)
    return _through_engine(model, engine, inputs, response_mask, chunk_size, recompute)


def _response_logprobs(lm_head, hidden: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                       chunk_size: int, recompute: bool = True) -> torch.Tensor:
    """sum_t log pi(y_t | ...) per row from the final hidden states, lm_head on one chunk at a time."""
    # Token t is predicted from the hidden state at t - 1. Keep response tokens only, packed.
    rows, positions = response_mask[:, 1:].bool().nonzero(as_tuple=True)    # one entry per y_t
    response_hidden = hidden[:, :-1][rows, positions]                        # h_{t-1}: [N, d]
    response_targets = input_ids[:, 1:][rows, positions]                     # y_t: [N]
    recompute_in_backward = recompute and torch.is_grad_enabled() and response_hidden.requires_grad

    total = hidden.new_zeros(input_ids.shape[0], dtype=torch.float32)
    for start in range(0, len(rows), chunk_size):
        chunk = slice(start, start + chunk_size)
        args = (lm_head, response_hidden[chunk], response_targets[chunk])
        if recompute_in_backward:
            token_logprobs = checkpoint(_chunk_token_logprobs, *args, use_reentrant=False)
        else:
            token_logprobs = _chunk_token_logprobs(*args)
        total = total.index_add(0, rows[chunk], token_logprobs)              # sum_t into each row
    return total


# --------------------------------------------------------------------------------------
# through a distributed engine's wrapper
# --------------------------------------------------------------------------------------
_KEEP_NO_LOGITS = torch.zeros(0, dtype=torch.long)      # logits_to_keep: the lm_head sees 0 positions


def _through_engine(model, wrapped, inputs: dict, response_mask: torch.Tensor, chunk_size: int,
                    recompute: bool) -> torch.Tensor:
    """The log-probs computed INSIDE the engine's forward of the whole causal LM.

    Calling ``model.get_decoder()`` directly would skip the root's forward hooks (FSDP's all-gather of
    the units the decoder call alone misses, DDP's gradient hooks); calling ``lm_head`` after the
    root's forward has returned leaves FSDP2's backward bookkeeping out of step (it crashed on CPU).
    So the wrapped model runs as usual with ``logits_to_keep`` = no position (its own lm_head sees an
    empty batch), and a forward hook on its decoder runs the same chunk loop on the decoder's output
    while the root's forward is still in progress: the same numbers as the plain path."""
    result = []

    def chunks(module, args, output):
        result.append(_response_logprobs(model.get_output_embeddings(), output.last_hidden_state,
                                         inputs["input_ids"], response_mask, chunk_size, recompute))

    handle = model.get_decoder().register_forward_hook(chunks)
    try:
        wrapped(**inputs, logits_to_keep=_KEEP_NO_LOGITS.to(inputs["input_ids"].device))
    finally:
        handle.remove()
    return result[-1]


@contextmanager
def eval_mode(model):
    """``model.eval()`` inside the block (no dropout), every module's own mode restored on exit.

    The ``training`` flags are set directly, as ``nn.Module.train`` sets them, not through
    ``PreTrainedModel.train``: with the ``kernels`` package (a dependency of transformers 5.x) that
    re-kernelises the model at every change of mode, ~0.7 ms per call on the tiny model, several
    times per step (sampling, a LoRA reference). The model keeps the kernels of its training mode."""
    modes = {module: module.training for module in model.modules()}
    for module in modes:
        module.training = False
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel    # optional dependency, only needed for LoRA
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class ReferenceModel:
    """pi_ref: frozen, in eval mode, evaluated without gradients.

    - A plain model is deep-copied (a snapshot of the policy as it is now), unless
      `copy=False`, for a separately loaded reference that may be frozen in place.
    - A PEFT (LoRA) model is NOT copied: pi_ref is the same module with its adapters
      disabled, i.e. the base weights W (LoRA gives W + B A with B = 0 at initialisation,
      so this is the initial policy), with no second copy of the weights in memory.
    """

    def __init__(self, model, copy: bool = True):
        self.uses_disabled_adapters = is_peft_model(model)
        if self.uses_disabled_adapters:
            self.model = model
        else:
            self.model = deepcopy(model) if copy else model
            self.model.eval().requires_grad_(False)

    @contextmanager
    def as_module(self):
        """pi_ref as a plain module, e.g. to sample from it: ``with ref.as_module() as m: ...``.
        For a PEFT model the adapters are disabled inside the block (and eval mode is kept)."""
        with eval_mode(self.model), self.model.disable_adapter() if self.uses_disabled_adapters else nullcontext():
            yield self.model

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor, chunk_size: int = 512,
                 engine: torch.nn.Module | None = None) -> torch.Tensor:
        """l_ref(y|x) = sum_t log pi_ref(y_t | x, y_<t), shape [B], no gradient: under ``torch.inference_mode``
        (no autograd bookkeeping; the [B] result is copied out of it, so that the loss may save it for
        backward), or ``no_grad`` with sharded weights (``engine``: FSDP2 gathers them into its own tensors)."""
        with torch.inference_mode() if engine is None else torch.no_grad():
            values = self._logprobs(input_ids, attention_mask, response_mask, chunk_size, engine)
        return values.clone() if values.is_inference() else values

    def _logprobs(self, input_ids, attention_mask, response_mask, chunk_size, engine) -> torch.Tensor:
        if not self.uses_disabled_adapters:
            return sequence_logprobs(self.model, input_ids, attention_mask, response_mask, chunk_size, engine)
        with eval_mode(self.model), self.model.disable_adapter():     # no dropout in pi_ref; W + B A  ->  W
            return sequence_logprobs(self.model, input_ids, attention_mask, response_mask, chunk_size, engine)

