"""Launched by tests/test_sharded.py with torchrun: one training run on CPU processes (gloo).

    sharded_run.py OUT ENGINE [lora] [preset=NAME] [fault=FAULT] [FIELD=VALUE ...]    ENGINE: fsdp2 | ddp

fsdp2: accelerate 1.15 selects FSDP only for GPU-type launches, so on CPU the test switches the
accelerator's state to FSDP2 after it is built: ``accelerator.prepare`` then runs accelerate's own
``fsdp2_prepare_model`` (``fully_shard`` per decoder layer, embeddings + norm + lm_head, root), as
``accelerate launch --config_file accelerate_fsdp.yaml`` does on GPUs. Process 0 writes
OUT/final.pt: the trainable weights gathered to full tensors, and the process count.

fault= (``tests/test_nonfinite_processes.py``) makes process 1 alone non-finite at its first training pass:
``nan-loss`` its hidden states (so its loss), ``nan-grad-shard`` its shard of the first decoder layer's
gradient after FSDP2's reduce-scatter (``set_all_reduce_hook``). Every process then writes OUT/rankR.pt:
how many steps it skipped (its "step skipped" warnings) and the trainable weights as it sees them.
"""
import sys
import warnings

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType

from sail_min.cli import leave_process_group, parse_set
from sail_min.config import SAILConfig
from sail_min.lab.sentiment import load_base_model, sentiment_task
from sail_min.runtime import GatheredState
from sail_min.train import train

out, engine, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
lora = "lora" in rest
preset = next((a.split("=", 1)[1] for a in rest if a.startswith("preset=")), "offline-dpo")
fault = next((a.split("=", 1)[1] for a in rest if a.startswith("fault=")), None)
overrides = parse_set([a for a in rest if "=" in a and not a.startswith(("preset=", "fault="))], SAILConfig().to_dict())
torch.set_num_threads(1)
accelerator = Accelerator(cpu=True)
if engine == "fsdp2":
    accelerator.state.distributed_type = DistributedType.FSDP            # AcceleratorState copies it from
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP    # PartialState when rebuilt
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True)
policy, tokenizer = load_base_model()
if lora:
    import peft
    torch.manual_seed(0)
    policy = peft.get_peft_model(policy, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0))


def poison_first_training_pass(policy, fault):
    """Process 1's first forward with gradient (a training pass: sampling and evaluation run without)."""
    decoder, done = policy.get_decoder(), []

    def nan_hidden_states(module, inputs, output):
        if torch.is_grad_enabled() and not done:
            done.append(fault)
            output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    def nan_shard(reduced_shard):                    # this process's shard of layer 0's gradient, in place
        if len(done) == 1:
            done.append("filled")
            reduced_shard.fill_(float("nan"))

    def set_the_hook_once_sharded(module, inputs):
        if torch.is_grad_enabled() and not done:     # train has sharded the model by now: an FSDPModule
            done.append(fault)
            decoder.layers[0].set_all_reduce_hook(nan_shard)

    if fault == "nan-loss":
        decoder.register_forward_hook(nan_hidden_states)
    elif fault == "nan-grad-shard":
        decoder.register_forward_pre_hook(set_the_hook_once_sharded)
    else:
        raise ValueError(f"unknown fault {fault!r}")


if fault and accelerator.process_index == 1:
    poison_first_training_pass(policy, fault)
config = SAILConfig.preset(preset, output_dir=out, **overrides)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train(config, policy, tokenizer, sentiment_task(), accelerator=accelerator, progress=False)
for warning in caught:
    print(f"rank {accelerator.process_index}: {warning.category.__name__}: {warning.message}", file=sys.stderr)
gathered = dict(GatheredState(policy, torch.optim.SGD([torch.zeros(1)])).named_parameters())   # every process
if accelerator.is_main_process:
    torch.save({"processes": accelerator.num_processes, "engine": str(accelerator.distributed_type),
                "sharded": sorted({type(p).__name__ for p in policy.parameters()}),
                "weights": {n: p.detach() for n, p in gathered.items() if p.requires_grad}}, f"{out}/final.pt")
if fault:
    torch.save({"skipped": sum("step skipped" in str(w.message) for w in caught),
                "weights": {n: p.detach() for n, p in gathered.items() if p.requires_grad}},
               f"{out}/rank{accelerator.process_index}.pt")
leave_process_group(accelerator)     # barrier, destroy the group, leave without finalisation (see its docstring)
