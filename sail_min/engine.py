"""Several processes: which engine owns the weights, and what the loop needs from it.

One process and no engine configured: nothing here changes anything. Otherwise ``prepare`` hands the
policy and its optimiser to accelerate: DDP (data parallel), FSDP2 (sharded in place) or DeepSpeed
(written, untested here); the engine then averages the gradients during backward, and
``sequence_logprobs`` runs its training forward through the engine's wrapper
(``logprobs.register_engine``). ``GatheredState`` gathers sharded weights and optimiser state for a
checkpoint; ``check_in_sync`` checks at the end of a run that replicated weights agree.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from .logprobs import ReferenceModel, register_engine


def prepare(policy, optimizer, reference: ReferenceModel, accelerator: Accelerator):
    """``accelerator.prepare(policy, optimizer)`` when there are several processes or a sharding config.

    - one process, no engine configured: the module and optimiser as they are (no wrapper, no hook);
    - DDP (MULTI_GPU / MULTI_CPU): ``policy`` stays the plain module (sampling, evaluation and
      checkpoints use it); the DDP wrapper is registered for ``sequence_logprobs``' training forward.
      ``init_sync=False``: every process loads the same weights and builds its reference from them,
      so a broadcast at wrap time would only hide a mismatch (the policies made equal, the references
      not); ``check_in_sync`` finds one at the end instead;
    - FSDP2: ``fully_shard`` per decoder layer, the embeddings + final norm + lm_head as one unit
      and the root (accelerate's wrapping), in place: ``policy`` is the same module with DTensor
      parameters. pi_ref: LoRA = the same sharded module with adapters disabled (no copy); a full
      model = its deep copy (taken before sharding), sharded the same way;
    - DeepSpeed (untested: not installed here): the engine is registered like DDP; LoRA only.
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.NO or (accelerator.num_processes == 1 and kind not in (DistributedType.FSDP,
                                                                                       DistributedType.DEEPSPEED)):
        return policy, optimizer
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
        return policy, optimizer
    wrapped, optimizer = accelerator.prepare(policy, optimizer)
    register_engine(policy, wrapped)
    return policy, optimizer


class NoInitSync(DistributedDataParallelKwargs):
    def to_kwargs(self):
        return {**super().to_kwargs(), "init_sync": False}


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


def deepspeed_step(loss: torch.Tensor, optimizer, accelerator: Accelerator) -> float | None:
    """DeepSpeed (UNTESTED, not installed here): ``accelerator.backward`` runs the engine's backward
    and step; clipping is the config's ``gradient_clipping``. A step is skipped on a non-finite loss
    only (the engine keeps the gradients partitioned; fp16 overflow is its own loss scaler's job).
    Returns NaN for the gradient norm (the engine keeps it), None for a skipped step."""
    finite = bool(accelerator.reduce(torch.tensor(float(bool(torch.isfinite(loss))), device=accelerator.device),
                                     "sum") == accelerator.num_processes)
    if finite:
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float("nan") if finite else None


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
