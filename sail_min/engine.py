"""The runtime under the loop: devices and processes, precision, memory, and the engine that owns the weights.

``train.py`` says WHAT one SAIL step computes; a ``Runtime`` says HOW it runs on this machine:

- precision: autocast for ``mixed_precision`` (bf16, or fp16 with a loss scaler), and the attention-kernel
  guard (PyTorch's cuDNN attention kernel off, see ``attention_kernels``);
- memory: gradient checkpointing;
- processes: DDP, FSDP2 or DeepSpeed through ``accelerator.prepare``; the engine averages gradients in
  backward, and ``engine_for`` names the module whose forward must run for a model's log-probs;
- the step: ``backward`` / ``clip_grad_norm`` / ``step``, with the finite check taken across processes
  (with several processes every one runs backward, even on a non-finite loss, so the engine's collectives
  stay matched);
- checkpoints: ``gathered`` weights and optimiser state of a sharded run; ``check_in_sync`` at the end;
- sampling: ``sampler`` builds the one ``sampling.Sampler`` of a call site from the config.

One process and no engine configured: no wrapper, no hook, nothing but autocast and the guard.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from .logprobs import ReferenceModel, _is_peft_model, sequence_logprobs
from .sampling import Sampler


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
        self.deepspeed = kind == DistributedType.DEEPSPEED
        self.sharded = kind in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.scaler = torch.amp.GradScaler(self.device.type) if config.mixed_precision == "fp16" else None
        self.wrapped = None               # DDP / DeepSpeed: what accelerator.prepare returned for the policy
        self._loss_finite = True          # set by backward, read by clip_grad_norm
        self._unscaled = False            # fp16: gradients unscaled this step, so the scaler updates

    # ---- precision -----------------------------------------------------------------------
    def autocast(self):
        """torch.autocast for ``mixed_precision`` ("no" = a disabled context: plain fp32)."""
        return autocast(self.config, self.device)

    @contextmanager
    def forward(self):
        """The context of every training forward and backward: autocast and the attention-kernel guard."""
        with self.autocast(), attention_kernels(self.config):
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
        in its forward); the DDP / DeepSpeed wrapper for a gradient-carrying forward (DDP arms its
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
    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward() (scaled under fp16) inside the attention guard: the engine averages here.
        Several processes: a non-finite loss is backpropagated as a zero through the same graph, so the
        others do not wait in its collectives (DDP's all-reduce, FSDP2's reduce-scatter) forever;
        ``clip_grad_norm`` then skips the step on every process. One process: no backward at all."""
        self._loss_finite = bool(torch.isfinite(loss))
        if self.deepspeed:                 # DeepSpeed (UNTESTED): its backward also steps; skip it on a bad loss
            finite = self.all_finite(self._loss_finite)
            if finite:
                with attention_kernels(self.config):
                    self.accelerator.backward(loss)
            self._loss_finite = finite
            return
        if not self._loss_finite:
            if self.processes == 1:
                return                                             # nothing waits for this backward
            loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0   # applied by no process
        with attention_kernels(self.config):                       # checkpointing re-runs attention here
            (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip_grad_norm(self, policy, optimizer) -> float | None:
        """The gradient norm before clipping, after clipping to ``max_grad_norm``; None (no step) unless
        the loss and every gradient are finite on ALL processes. fp16: the gradients are unscaled first."""
        if self.deepspeed:                 # the engine keeps the norm; clipping is its config's
            return float("nan") if self._loss_finite else None
        if self.scaler and self._loss_finite:
            self.scaler.unscale_(optimizer)
            self._unscaled = True
        finite = self._loss_finite and all(bool(torch.isfinite(local_shard(p.grad)).all())
                                           for p in policy.parameters() if p.grad is not None)
        if not self.all_finite(finite):
            return None                                            # DTensors (FSDP2): the global norm below
        return torch.nn.utils.clip_grad_norm_(policy.parameters(), self.config.max_grad_norm or float("inf")).item()

    def step(self, optimizer, grad_norm: float | None) -> None:
        """optimizer.step() if the step is taken (through the fp16 scaler), then the scaler's update."""
        if grad_norm is not None:
            self.scaler.step(optimizer) if self.scaler else optimizer.step()
        if self._unscaled:
            self.scaler.update()                                   # lowers the fp16 scale after an overflow
            self._unscaled = False

    def all_finite(self, finite: bool) -> bool:
        """True only if ``finite`` holds on every process (one all-reduce; one process: as it is)."""
        if self.processes == 1:
            return finite
        total = self.accelerator.reduce(torch.tensor(float(finite), device=self.device), "sum")
        return bool(total == self.processes)

    # ---- checkpoints and the end of a run -------------------------------------------------------
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
                       text_prompts=config.text_prompts, cache=cache, compile=config.generation_compile,
                       isolate=config.cudagraph_isolation, rows=rows if fixed else None,
                       prompt_length=config.max_prompt_tokens if fixed else None,
                       synced_gpus=self.accelerator.distributed_type == DistributedType.FSDP,
                       precision=self.autocast)


# --------------------------------------------------------------------------------------
# precision and memory
# --------------------------------------------------------------------------------------
def autocast(config, device: torch.device):
    """torch.autocast for ``config.mixed_precision`` ("no" = a disabled context: plain fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@contextmanager
def attention_kernels(config):
    """PyTorch's cuDNN attention kernel off inside (unless ``config.cudnn_attention``), restored on exit.

    Its backward on H100/H200 returns NaN query gradients (the forward is fine, so is the loss) when
    an attention mask is passed, seq_len % 128 == 64 and a row's logsumexp is below -88.7 = -ln(FLT_MAX):
    pytorch/pytorch#196678 (reproduced here on an H200: results/gpu/bench_loop.log). Both the forward and
    the backward must run inside: the kernel of the backward is chosen in the forward, except under
    gradient checkpointing, which re-runs the attention forward during backward. The flag is
    process-global (no effect on a CPU)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(before and config.cudnn_attention)
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
# engines: DDP, FSDP2, DeepSpeed
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
      model = its deep copy (taken before sharding), sharded the same way;
    - DeepSpeed (untested: not installed here): the engine wraps like DDP; LoRA only.
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.NO or (accelerator.num_processes == 1 and kind not in (DistributedType.FSDP,
                                                                                       DistributedType.DEEPSPEED)):
        return policy, optimizer, None
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise NotImplementedError("FSDP1 is not supported: set fsdp_version: 2 (accelerate_fsdp.yaml)")
    if kind == DistributedType.DEEPSPEED and not reference.uses_disabled_adapters:
        raise NotImplementedError("DeepSpeed with a full-model policy would keep an unsharded reference copy on "
                                  "every GPU: use LoRA (pi_ref = adapters disabled) or FSDP2")
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
    base = model.get_base_model() if _is_peft_model(model) else model
    return isinstance(model, FSDPModule) or isinstance(base, FSDPModule)


def unwrapped(policy):
    return getattr(policy, "module", policy) if is_engine(policy) else policy


def is_engine(module) -> bool:
    return isinstance(module, torch.nn.parallel.DistributedDataParallel) or type(module).__name__ == "DeepSpeedEngine"


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (a DTensor's local shard; any other tensor as it is)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_tensor(tensor):
    """A DTensor gathered to the full tensor (collective: every process calls it, in the same order)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class GatheredState:
    """What ``save_checkpoint`` reads (``named_parameters``, the optimiser's ``state_dict``), with
    sharded tensors gathered to full ones. Built on every process (collectives), saved by process 0."""

    def __init__(self, policy, optimizer):
        named = list(policy.named_parameters())
        if any(hasattr(p, "ds_id") for _, p in named):       # DeepSpeed ZeRO-3 (UNTESTED): gather, copy
            import deepspeed
            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                self.params = [(name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                               for name, p in named]
            self.optimizer_state = {"state": {}, "param_groups": []}    # partitioned by the engine: not saved
            return
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

