"""Launched by tests/test_train.py with 2 processes: rank 1's policy is perturbed before training."""
import sys

import torch
from accelerate import Accelerator

from sail_min.config import SAILConfig
from sail_min.lab.sentiment import load_base_model, sentiment_task
from sail_min.train import train

accelerator = Accelerator(cpu=True)
policy, tokenizer = load_base_model()
if accelerator.process_index == 1:
    with torch.no_grad():
        next(policy.parameters()).add_(1e-3)
config = SAILConfig.preset("offline-dpo", steps=2, pairs_per_step=4, eval_prompts=4, eval_every=2,
                           output_dir=sys.argv[1])
train(config, policy, tokenizer, sentiment_task(), accelerator=accelerator, progress=False)
