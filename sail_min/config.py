"""SAILConfig: every knob of a training run, one docstring each, and the named presets.

The routing and coefficient fields come from ``objective.Recipe`` (SAILConfig extends it), so
the bandit and the language-model loop share one definition of what each variant is.
Presets (``SAILConfig.preset(name, **overrides)``) follow the public SAIL code's defaults
(configs/tasks.yaml) where they apply: SAIL-DP r=0.4 rho=0.2, SAIL-PP p=0.3 pi=0.2,
SAIL-PR g=0.3 gamma=0.3, the rest of the pairs offline DPO; beta=0.1. The public code used
RMSprop at lr 1e-5 with LoRA on 0.5-8B models; the tiny toy model here trains from scratch
weights and uses AdamW at a larger lr.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

from .objective import BASELINES, PRESETS, Recipe


@dataclass(frozen=True)
class SAILConfig(Recipe):
    """A training run. Invalid values fail here, at construction, with the field's name."""

    beta: float = 0.1
    """KL coefficient beta of the implicit reward beta * (l_theta - l_ref)"""
    baseline: str = "loo"
    """response-term baseline: "loo" (leave-one-out batch mean of the pair loss) or "none\""""
    optimizer: str = "adamw"
    """"adamw" or "rmsprop" (the public code's choice)"""
    lr: float = 5e-4
    """learning rate"""
    weight_decay: float = 0.0
    """weight decay (decoupled for AdamW, plain L2 for RMSprop)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm (0 = off)"""
    steps: int = 60
    """optimiser steps"""
    pairs_per_step: int = 16
    """preference pairs per optimiser step, all routes together (per process)"""
    samples_per_prompt: int = 2
    """k responses sampled per prompt for online pairs (the first two form the pair)"""
    max_new_tokens: int = 24
    """generation length limit (24 fits the toy task; real chat models need ~128-512); responses cut
    here have no EOS (logged as contains_eos)"""
    temperature: float = 1.0
    """sampling temperature for online pairs (1 = sample pi_theta itself)"""
    max_prompt_tokens: int = 512
    """prompts longer than this are truncated from the left (counted in the metrics)"""
    generation_cache: str = "dynamic"
    """KV cache for sampling: "dynamic" (plain generate) or "static" (compiled on a GPU, ~5x faster)"""
    mixed_precision: str = "no"
    """"no" (fp32), "bf16" or "fp16" autocast of the forward passes (accelerate; fp16 adds loss scaling)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~1.3-1.8x slower steps"""
    eval_every: int = 20
    """evaluate every this many steps (and at the end)"""
    eval_prompts: int = 64
    """held-out prompts used for judge reward, win rate and KL"""
    checkpoint_every: int = 20
    """save a resumable checkpoint every this many steps (0 = only at the end)"""
    seed: int = 0
    """seed of every random choice: routing, data order, sampling, evaluation"""
    output_dir: str = "outputs/run"
    """folder for metrics.jsonl, checkpoints and the final model"""

    def __post_init__(self):
        super().__post_init__()
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)                          # noqa: E731
        for name in ("beta", "lr", "temperature"):
            if not (number(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if not (number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name, least in (("steps", 1), ("pairs_per_step", 1), ("max_new_tokens", 1), ("max_prompt_tokens", 1),
                            ("eval_every", 1), ("eval_prompts", 1), ("samples_per_prompt", 2),
                            ("checkpoint_every", 0), ("seed", 0)):
            if not (integer(getattr(self, name)) and getattr(self, name) >= least):
                raise ValueError(f"{name} must be an integer >= {least}, got {getattr(self, name)!r}")
        uses_response_term = (self.route_pr > 0 and self.pr_response_coef > 0) or (self.route_pp > 0 and self.pp_coef > 0)
        if self.temperature != 1.0 and uses_response_term and self.response_mode == "exact":
            warnings.warn(f"temperature={self.temperature} samples from a tempered policy, not pi_theta: the "
                          "exact response term (and the eval KL estimate) assume temperature 1", stacklevel=3)
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.generation_cache not in ("dynamic", "static"):
            raise ValueError(f"generation_cache must be 'dynamic' or 'static', got {self.generation_cache!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.optimizer not in ("adamw", "rmsprop"):
            raise ValueError(f"optimizer must be 'adamw' or 'rmsprop', got {self.optimizer!r}")

    @property
    def recipe(self) -> Recipe:
        """The routing and coefficient part alone."""
        return Recipe(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Recipe)})

    @classmethod
    def preset(cls, name: str, **overrides) -> "SAILConfig":
        """A named preset ("offline-dpo", "online-dpo", "sail-pr", "sail-pp", "sail-dp") with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown SAILConfig field(s) {unknown}")
        return cls(**{**dataclasses.asdict(PRESETS[name]), **overrides})

    def replace(self, **changes) -> "SAILConfig":
        return dataclasses.replace(self, **changes)
