"""The runtime under the loop: devices and processes, precision, memory, and the engine that owns the weights.

``train.py`` says WHAT one SAIL step computes; a ``Runtime`` says HOW it runs on this machine. "Engine" means one
thing here: the distributed module whose forward a training step must run through, a DDP wrapper or the
FSDP2-sharded model itself (``Runtime.engine_for``; ``sequence_logprobs(engine=...)``).

- precision: autocast for ``mixed_precision`` (bf16, or fp16 with a loss scaler), and the attention-kernel
  guard (PyTorch's cuDNN attention kernel off, see ``attention_kernels``);
- memory: gradient checkpointing;
- processes: DDP or FSDP2 through ``accelerator.prepare`` (DeepSpeed is refused); the engine averages gradients
  in backward;
- the step: ``Runtime.step(loss, policy, optimizer) -> StepResult``: backward, the finite check across processes
  (with several processes every one runs backward, even on a non-finite loss, so the engine's collectives stay
  matched), clip, optimizer step, the fp16 scaler's update;
- checkpoints: ``save_checkpoint`` of gathered weights and optimiser state; ``check_in_sync`` at the end;
- sampling: ``sampler`` builds the one ``sampling.Sampler`` of a call site from the config.

One process and no engine configured: no wrapper, no hook, nothing but autocast and the guard.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from .checkpoint import save_checkpoint
from .logprobs import ReferenceModel, is_peft_model, sequence_logprobs
from .sampling import Sampler


@dataclass(frozen=True)
class StepResult:
    """What ``Runtime.step`` did."""

    taken: bool
    """the optimiser stepped: the loss and every gradient were finite on every process"""
    grad_norm: float
    """global gradient norm before clipping (nan when the step was not taken)"""
    loss_finite: bool
    """the loss was finite on every process"""


class ProcessFailed(RuntimeError):
    """Another process of the run failed (``Runtime.together``): its one-line message, its rank, and the kind of
    error it raised (e.g. "JudgeError")."""

    def __init__(self, message: str, rank: int, kind: str):
        super().__init__(message)
        self.rank, self.kind = rank, kind


class Runtime:
    """How a run executes: ``Runtime(config)`` for one process, ``Runtime(config, accelerator)`` under
    ``accelerate launch``. Holds the config's runtime fields (precision, kernels, checkpointing, cache)."""

    def __init__(self, config, accelerator: Accelerator | None = None):
        self.config = config
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.rank, self.processes = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        kind = self.accelerator.distributed_type
        if kind == DistributedType.DEEPSPEED:
            raise NotImplementedError("DeepSpeed is not supported: FSDP2 is the tested way to shard "
                                      "(accelerate launch --config_file accelerate_fsdp.yaml ...)")
        self.sharded = kind == DistributedType.FSDP
        self.scaler = torch.amp.GradScaler(self.device.type) if config.mixed_precision == "fp16" else None
        self.wrapped = None               # DDP: what accelerator.prepare returned for the policy

    # ---- precision -----------------------------------------------------------------------
    def autocast(self):
        """torch.autocast for ``mixed_precision`` ("no" = a disabled context: plain fp32)."""
        return autocast(self.config.mixed_precision, self.device)

    @contextmanager
    def forward(self):
        """The context of every training forward and backward: autocast and the attention-kernel guard."""
        with self.autocast(), attention_kernels(self.config.cudnn_attention):
            yield

    # ---- processes -------------------------------------------------------------------------
    def prepare(self, policy, optimizer, reference: ReferenceModel):
        """Gradient checkpointing if asked, then the engine: returns (policy, optimizer) to train with."""
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        policy, optimizer, self.wrapped = prepare(policy, optimizer, reference, self.accelerator)
        return policy, optimizer

    def engine_for(self, model) -> torch.nn.Module | None:
        """The module whose forward must run for ``model``'s log-probs (``sequence_logprobs(engine=...)``):
        the model itself when sharded in place (FSDP2, with or without gradient: its weights are gathered
        in its forward); the DDP wrapper for a gradient-carrying forward (DDP arms its
        all-reduce there); None otherwise (a plain model, pi_ref, evaluation)."""
        if is_fully_sharded(model):
            return model
        if self.wrapped is not None and torch.is_grad_enabled() and unwrapped(self.wrapped) is model:
            return self.wrapped
        return None

    def logprobs(self, model, inputs: dict) -> torch.Tensor:
        """``sequence_logprobs`` of a batch on this device, through the engine when one owns ``model``."""
        return sequence_logprobs(model, **inputs, engine=self.engine_for(model))

    def reference_logprobs(self, reference: ReferenceModel, inputs: dict) -> torch.Tensor:
        return reference.logprobs(**inputs, engine=self.engine_for(reference.model))

    # ---- the step ------------------------------------------------------------------------------
    def step(self, loss: torch.Tensor, policy, optimizer) -> "StepResult":
        """backward, clip, optimizer step: ``loss.backward(); clip_grad_norm_(...); optimizer.step()`` of plain
        PyTorch, with three additions, all visible here:

        1. finite check on EVERY process: the step is taken only if the loss and the gradient norm (so every
           gradient) are finite on all processes (one all-reduce), else skipped on all, weights untouched (``StepResult.taken`` False).
           With several processes a non-finite loss is still backpropagated, as a zero through the same graph,
           so the other processes do not wait in the engine's collectives (DDP's all-reduce, FSDP2's
           reduce-scatter) forever; one process skips its backward;
        2. fp16 (``mixed_precision="fp16"``): the loss is scaled before backward and the gradients unscaled
           before the finite check, the norm and the clip; the scaler's update runs on every step, taken or
           not, so an overflow lowers the scale (a non-finite loss, which has no unscaled gradients, lowers it
           by the scaler's backoff factor);
        3. the gradient norm is measured BEFORE clipping (to ``max_grad_norm``; 0 = no clipping).
        Backward runs inside the attention-kernel guard. ``optimizer.zero_grad()`` is the caller's, before."""
        loss_finite = self.all_finite(bool(torch.isfinite(loss)))
        if loss_finite or self.processes > 1:
            if not loss_finite:
                loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0   # applied by no process
            with attention_kernels(self.config.cudnn_attention):  # checkpointing re-runs attention here
                (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler and loss_finite:
            self.scaler.unscale_(optimizer)
        grad_norm = float("nan")
        if loss_finite:            # ||g|| over every gradient (DTensors, FSDP2: the global norm), before clipping;
            total_norm = torch.nn.utils.get_total_norm([p.grad for p in policy.parameters() if p.grad is not None])
            grad_norm = total_norm.item()       # inf or NaN iff some gradient is (or ||g|| overflows float32)
        taken = self.all_finite(math.isfinite(grad_norm))
        if taken:
            if self.config.max_grad_norm:                          # g <- g * min(1, max_grad_norm / ||g||)
                torch.nn.utils.clip_grads_with_norm_(policy.parameters(), self.config.max_grad_norm, total_norm)
            self.scaler.step(optimizer) if self.scaler else optimizer.step()
        if self.scaler:
            if loss_finite:
                self.scaler.update()                               # lowers the scale after an overflow
            else:                                                  # (scale() first: a first step's scale is lazy)
                self.scaler.scale(torch.zeros((), device=self.device))
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        return StepResult(taken=taken, grad_norm=grad_norm, loss_finite=loss_finite)

    def all_finite(self, finite: bool) -> bool:
        """True only if ``finite`` holds on every process (one all-reduce; one process: as it is)."""
        if self.processes == 1:
            return finite
        total = self.accelerator.reduce(torch.tensor(float(finite), device=self.device), "sum")
        return bool(total == self.processes)

    @contextmanager
    def together(self):
        """A block that every process enters: if it raises an ``Exception`` on one process, it raises on every
        one, so no process waits forever in a collective of the next step. The failing process raises its own
        error; the others raise ``ProcessFailed`` carrying the first failing process's one-line message. One
        process: the block as it is. Several: one ``all_gather_object`` of the outcome at the block's end."""
        try:
            yield
        except Exception as error:
            if self.processes > 1:
                self._outcomes(" ".join(str(error).split()) or type(error).__name__, type(error).__name__)
            raise
        else:
            if self.processes > 1:
                failed = self._outcomes(None, None)
                if failed:
                    rank, message, kind = failed[0]
                    raise ProcessFailed(f"process {rank}: {message}", rank=rank, kind=kind)

    def _outcomes(self, message, kind) -> list[tuple[int, str, str]]:
        outcomes = [None] * self.processes
        torch.distributed.all_gather_object(outcomes, (message, kind))
        return [(rank, m, k) for rank, (m, k) in enumerate(outcomes) if m is not None]

    # ---- who does what -------------------------------------------------------------------------
    @property
    def evaluates(self) -> bool:
        """This process takes part in evaluation: process 0, or every process when the weights are sharded."""
        return self.is_main or self.sharded

    @property
    def alone(self) -> bool:
        """One process: extra backward passes (per-term gradient norms) cannot desynchronise the others."""
        return self.processes == 1

    # ---- checkpoints and the end of a run -------------------------------------------------------
    def save_checkpoint(self, path, policy, optimizer, **state) -> None:
        """``checkpoint.save_checkpoint`` of the trainable weights, optimiser and scaler, with the config and
        ``state`` (next_step, counters). Sharded: every process gathers the full tensors (collective),
        process 0 writes."""
        model, optimizer_state = self.gathered(policy, optimizer)
        if self.is_main:
            save_checkpoint(path, model=model, optimizer=optimizer_state, config=self.config.to_dict(),
                            scaler=self.scaler, **state)

    def gathered(self, policy, optimizer):
        """What ``save_checkpoint`` reads: the policy and optimiser, or their full tensors when sharded
        (collective: every process calls it; process 0 saves)."""
        if not self.sharded:
            return policy, optimizer
        gathered = GatheredState(policy, optimizer)          # stands in for both: named_parameters, state_dict
        return gathered, gathered

    def finish(self, policy) -> None:
        """Wait for every process and check that replicated weights agree."""
        self.accelerator.wait_for_everyone()
        check_in_sync(policy, self.accelerator)

    # ---- sampling --------------------------------------------------------------------------------
    def sampler(self, tokenizer, rows: int, cache: str | None = None) -> Sampler:
        """The sampler of one call site: ``rows`` is the batch the static cache's fixed shape pads to
        (training: 2 pairs_per_step; evaluation: eval_prompts), ``cache`` overrides the config's."""
        config = self.config
        cache = config.generation_cache if cache is None else cache
        fixed = cache == "static" and config.generation_shapes == "fixed"
        return Sampler(tokenizer=tokenizer, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                       prompt_format=config.prompt_format, cache=cache, compile=config.generation_compile,
                       isolate=config.cudagraph_isolation, rows=rows if fixed else None,
                       prompt_length=config.max_prompt_tokens if fixed else None,
                       synced_gpus=self.accelerator.distributed_type == DistributedType.FSDP,
                       precision=self.autocast)


# --------------------------------------------------------------------------------------
# precision and memory
# --------------------------------------------------------------------------------------
def autocast(mixed_precision: str, device: torch.device):
    """torch.autocast for ``mixed_precision`` "bf16" or "fp16" ("no" = a disabled context: plain fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@contextmanager
def attention_kernels(cudnn_attention: bool):
    """PyTorch's cuDNN attention kernel off inside (unless ``cudnn_attention``, the config's field), restored on exit.

    Its backward on H100/H200 returns NaN query gradients (the forward is fine, so is the loss) when
    an attention mask is passed, seq_len % 128 == 64 and a row's logsumexp is below -88.7 = -ln(FLT_MAX):
    pytorch/pytorch#196678 (reproduced here on an H200: results/gpu/bench_loop.log). Both the forward and
    the backward must run inside: the kernel of the backward is chosen in the forward, except under
    gradient checkpointing, which re-runs the attention forward during backward. The flag is
    process-global (no effect on a CPU)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(bool(before and cudnn_attention))
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def enable_gradient_checkpointing(policy) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (what ``gradient_checkpointing`` turns on)."""
    enable = getattr(policy, "activation_checkpointing_enable", None)      # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# --------------------------------------------------------------------------------------
# engines: DDP, FSDP2
# --------------------------------------------------------------------------------------
def prepare(policy, optimizer, reference: ReferenceModel, accelerator: Accelerator):
    """``accelerator.prepare(policy, optimizer)`` when there are several processes or a sharding config.
    Returns (policy, optimizer, the engine's wrapper of the policy or None).

    - one process, no engine configured: the module and optimiser as they are (no wrapper, no hook);
    - DDP (MULTI_GPU / MULTI_CPU): ``policy`` stays the plain module (sampling, evaluation and
      checkpoints use it); the DDP wrapper runs the training forward (``Runtime.engine_for``).
      ``init_sync=False``: every process loads the same weights and builds its reference from them,
      so a broadcast at wrap time would only hide a mismatch (the policies made equal, the references
      not); ``check_in_sync`` finds one at the end instead;
    - FSDP2: ``fully_shard`` per decoder layer, the embeddings + final norm + lm_head as one unit
      and the root (accelerate's wrapping), in place: ``policy`` is the same module with DTensor
      parameters. pi_ref: LoRA = the same sharded module with adapters disabled (no copy); a full
      model = its deep copy (taken before sharding), sharded the same way.
    DeepSpeed is refused by ``Runtime`` (FSDP2 is the tested way to shard).
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.NO or (accelerator.num_processes == 1 and kind != DistributedType.FSDP):
        return policy, optimizer, None
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise NotImplementedError("FSDP1 is not supported: set fsdp_version: 2 (accelerate_fsdp.yaml)")
    if kind != DistributedType.FSDP and accelerator.ddp_handler is None:
        accelerator.ddp_handler = NoInitSync()
    if accelerator.is_fsdp2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model
        # PEFT: the FSDP root is the causal LM inside the PeftModel, since PeftModel.generate calls that
        # model's generate (a root above it would be skipped, as a direct decoder call skips the LM's)
        root = policy.get_base_model() if reference.uses_disabled_adapters else policy
        _, optimizer = accelerator.prepare(root, optimizer)              # fully_shard in place
        if not reference.uses_disabled_adapters:
            fsdp2_prepare_model(accelerator, reference.model)
        return policy, optimizer, None
    wrapped, optimizer = accelerator.prepare(policy, optimizer)
    return policy, optimizer, wrapped


class NoInitSync(DistributedDataParallelKwargs):
    def to_kwargs(self):
        return {**super().to_kwargs(), "init_sync": False}


def is_fully_sharded(model) -> bool:
    """FSDP2 (``fully_shard``) on the model, or on the causal LM inside a PEFT model."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    base = model.get_base_model() if is_peft_model(model) else model
    return isinstance(model, FSDPModule) or isinstance(base, FSDPModule)


def unwrapped(policy):
    return getattr(policy, "module", policy) if is_engine(policy) else policy


def is_engine(module) -> bool:
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


def full_tensor(tensor):
    """A DTensor gathered to the full tensor (collective: every process calls it, in the same order)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class GatheredState:
    """What ``save_checkpoint`` reads (``named_parameters``, the optimiser's ``state_dict``), with
    sharded tensors gathered to full ones. Built on every process (collectives), saved by process 0."""

    def __init__(self, policy, optimizer):
        named = list(policy.named_parameters())
        self.params = [(name, torch.nn.Parameter(full_tensor(p.detach()), requires_grad=p.requires_grad))
                       for name, p in named]
        state = optimizer.state_dict()
        self.optimizer_state = {**state, "state": {i: {k: full_tensor(v) for k, v in s.items()}
                                                  for i, s in sorted(state["state"].items())}}

    def named_parameters(self):
        return iter(self.params)

    def state_dict(self):
        return self.optimizer_state


def check_in_sync(policy, accelerator: Accelerator) -> None:
    """Every process must end with the same weights (gradients were averaged across them).
    Sharded parameters (DTensors) have one copy, spread over the processes: nothing to compare."""
    if accelerator.num_processes == 1:
        return
    replicated = [p for p in policy.parameters() if not hasattr(p, "to_local")]
    if not replicated:
        return
    checksum = torch.stack([p.detach().double().sum() for p in replicated]).sum().reshape(1)
    gathered = accelerator.gather(checksum)
    if not torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=1e-6, atol=1e-9):
        raise RuntimeError(f"processes ended with different weights: checksums {gathered.tolist()}")

