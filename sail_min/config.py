"""SAILConfig: every knob of a run, one default and one docstring each; the routes; the presets.

A SAIL run mixes four kinds of pair, dpo / dp / pp / pr (the table of where each one's responses and label
come from, and its extra terms, is in ``routes.py``; the public code draws one kind per training example).

``route_*`` are the probabilities of each kind (r, p, g and 1 - r - p - g in the public code),
``dp_label_coef``, ``pp_coef`` and ``pr_response_coef`` the coefficients of the extra terms
(rho, kappa, gamma; the paper and the public code write SAIL-PP's kappa as pi, a name kept here for
policies only). A preset is nothing but a few of these fields set (``PRESETS``); every other
field keeps its default. Presets follow the public code's defaults (configs/tasks.yaml): SAIL-DP
r=0.4 rho=0.2, SAIL-PP p=0.3 kappa=0.2 (its `pi`), SAIL-PR g=0.3 gamma=0.3. The other defaults fit the tiny
toy task (a 0.35 M-parameter model trained from its own base weights with AdamW); a real model
overrides lr, max_new_tokens, max_prompt_tokens, precision and the generation settings
(notebook 07, or ``python -m sail_min train --set FIELD=VALUE``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .objective import BASELINES, PUBLIC_HOOK_SCALE, RESPONSE_MODES

from .routes import LABELS_FROM, RESPONSES_FROM, ROUTES  # noqa: F401  (the routes, defined in routes.py)

PRESETS = {
    "offline-dpo": {},                                                  # every pair from the dataset
    "online-dpo": dict(route_dpo=0.0, route_pr=1.0),                    # every pair sampled + judged
    "sail-pr": dict(route_dpo=0.7, route_pr=0.3, pr_response_coef=0.3),
    "sail-pp": dict(route_dpo=0.7, route_pp=0.3, pp_coef=0.2),
    "sail-dp": dict(route_dpo=0.6, route_dp=0.4, dp_label_coef=0.2),
    # iterative DPO in rounds (RLHFlow-style, simplified): online DPO that trains 4 steps on each labelled batch
    "iterative-dpo": dict(route_dpo=0.0, route_pr=1.0, reuse_steps=4),
}
"""Named presets: the fields they set; everything else is SAILConfig's default."""

RENAMED_FIELDS = {"text_prompts": "prompt_format"}
"""{deprecated field name: its name now}: ``from_dict`` (``--config``, ``--set``) reads the old name with a warning."""

# The choices of every multiple-choice field, defined once: validation and the CLI's help read them
# (``choices``). The objective's own two are objective.RESPONSE_MODES and objective.BASELINES.
ResponseMode = Literal[RESPONSE_MODES]
Baseline = Literal[BASELINES]
SelfLabels = Literal["sampled", "expected"]
Optimizer = Literal["adamw", "rmsprop"]
PromptFormat = Literal["chat", "text"]
GenerationCache = Literal["dynamic", "static"]
GenerationShapes = Literal["fixed", "bucketed"]
GenerationCompile = Literal["cudagraphs", "no-cudagraphs", "eager-backend", "off"]
MixedPrecision = Literal["no", "bf16", "fp16"]



@dataclass(frozen=True)
class SAILConfig:
    """A training run. Invalid values fail here, at construction, with the field's name."""

    # ---- the variant: routing and the extra terms ---------------------------------------
    route_dpo: float = 1.0
    """probability that a pair is a dataset pair with its dataset label (1 - r - p - g)"""
    route_dp: float = 0.0
    """probability of a dataset pair relabelled by the policy (SAIL-DP, r)"""
    route_pp: float = 0.0
    """probability of a policy pair labelled by the policy (SAIL-PP, p)"""
    route_pr: float = 0.0
    """probability of a policy pair labelled by the judge (SAIL-PR / online DPO, g)"""
    dp_label_coef: float = 0.0
    """rho: label-term coefficient on dp pairs"""
    pp_coef: float = 0.0
    """kappa: label- and response-term coefficient on pp pairs (the paper's pi)"""
    pr_response_coef: float = 0.0
    """gamma: response-term coefficient on pr pairs (0 = online DPO)"""
    response_mode: ResponseMode = "exact"
    """"exact" (the derivation), "public" (the public code's gradient hook) or "off\""""
    baseline: Baseline = "loo"
    """response-term baseline: "loo" (leave-one-out mean of the pair loss over the step's pairs of the same
    route) or "none\""""
    self_labels: SelfLabels = "sampled"
    """labels from the policy's own model (dp, pp): "sampled" (a draw of sig(z), as in the paper) or
    "expected" (the label averaged out exactly: the same expected gradient without the label's noise; the pair,
    and so the response term, is still sampled)"""
    public_hook_scale: float = PUBLIC_HOOK_SCALE
    """response_mode "public": weight of the hook relative to the mean DPO term; the public code's hook is
    divided by neither batch nor accumulation, so it weighs per-device batch x accumulation (4 x 2)"""
    beta: float = 0.1
    """KL coefficient beta of the implicit reward beta * (l_theta - l_ref)"""

    # ---- optimisation -------------------------------------------------------------------
    optimizer: Optimizer = "adamw"
    """"adamw" or "rmsprop" (the public code's choice)"""
    lr: float = 5e-4
    """learning rate"""
    weight_decay: float = 0.0
    """weight decay (decoupled for AdamW, plain L2 for RMSprop)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm (0 = off)"""
    steps: int = 42
    """optimiser steps (42 x 16 pairs = the toy task's 672 offline pairs once)"""
    pairs_per_step: int = 16
    """preference pairs per optimiser step, all routes together (per process)"""
    reuse_steps: int = 1
    """optimiser steps on each drawn and labelled batch of pairs (a round of iterative DPO): more steps
    per judge label; log-probs are recomputed every step, pairs and labels are not. What was drawn at the round's
    first step is importance-weighted (``routes.reuse_weights``): a policy pair by pi_theta / pi_old of the pair, a
    drawn self-label (dp, pp) by P_theta(label) / P_old(label). Unbiased up to the clip of those weights
    (``objective.importance_weights``), which biases the terms when the policy moves far within a round"""
    seed: int = 0
    """seed of every random choice: routing, data order, sampling, labels, evaluation"""

    # ---- sampling -----------------------------------------------------------------------
    max_new_tokens: int = 24
    """generation length limit (24 fits the toy task; real chat models need ~128-512); responses cut
    here have no EOS (logged as contains_eos)"""
    temperature: float = 1.0
    """sampling temperature for online pairs (1 = sample pi_theta itself)"""
    prompt_format: PromptFormat = "chat"
    """how a plain-text prompt meets the policy's chat template: "chat" wraps it as one user message,
    "text" leaves it as text (TRL's behaviour); message-list prompts always use the template"""
    max_prompt_tokens: int = 512
    """prompts longer than this (chat template included) are cut from the left, in training,
    evaluation and reference sampling alike (counted in the metrics)"""
    max_completion_tokens: int = 256
    """dataset responses (chosen and rejected) longer than this many tokens, EOS included, keep their
    first max_completion_tokens tokens and lose the EOS, like a sample cut at max_new_tokens
    (TRL's max_completion_length); counted as truncated_responses in the metrics. 256 never cuts the toy
    task's responses (17 tokens at most); long real data (UltraFeedback) needs it on a 16 GB GPU"""

    # ---- runtime: how a step runs on this machine, not what it computes (``runtime.Runtime``) ----
    generation_cache: GenerationCache = "dynamic"
    """KV cache for sampling: "dynamic" (plain generate) or "static" (compiled on a GPU, ~4x faster)"""
    generation_shapes: GenerationShapes = "fixed"
    """static cache only: "fixed" pads every sampling batch to max_prompt_tokens x 2 pairs_per_step
    rows (evaluation: x eval_prompts rows), so a run compiles twice at most; "bucketed" pads prompts to
    a multiple of 64 tokens and rows to a power of two (less padding, a compilation per new shape)"""
    generation_compile: GenerationCompile = "cudagraphs"
    """static cache on a GPU: "cudagraphs" (transformers' default, torch.compile mode reduce-overhead),
    "no-cudagraphs" (torch.compile without CUDA graphs) or "off" (static cache, no compilation); and
    "eager-backend" (torch.compile's eager backend, on a CPU too: the same tracing and guards, so the
    same compilations, without generating kernels: how the tests count compilations on a CPU)"""
    cudagraph_isolation: bool = True
    """copy what generate returns and start a new CUDA-graph step before training, so no later graph
    replay can overwrite a tensor the loss still reads (switch off only to diagnose)"""

    # ---- precision and memory -----------------------------------------------------------
    mixed_precision: MixedPrecision = "no"
    """"no" (fp32), "bf16" or "fp16" autocast of the forward passes (fp16 adds loss scaling)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~1.3-1.8x slower steps"""
    cudnn_attention: bool = False
    """let PyTorch pick its cuDNN attention kernel in the training forward and backward. Off by default: on
    H100/H200 (reported for torch 2.11 to 2.13) its backward returns NaN query gradients when a mask is passed
    (any padding), seq_len % 128 == 64 and some row's logsumexp is below -88.7 (pytorch#196678, TRL#7181);
    the flash / memory-efficient kernels take over. Sampling and evaluation are not affected"""

    # ---- evaluation and bookkeeping -----------------------------------------------------
    eval_every: int = 7
    """evaluate every this many steps (and at the end)"""
    eval_prompts: int = 64
    """held-out prompts used for judge reward, win rate and KL"""
    checkpoint_every: int = 20
    """save a resumable checkpoint every this many steps (0 = only at the end)"""
    judge_timeout_s: float = 0.0
    """seconds a judge call may take before the run ends with a one-line error naming the judge and the
    step (the last checkpoint kept, ready for --resume); 0 = wait as long as it takes"""
    output_dir: str = "outputs/run"
    """folder for config.json, metrics.jsonl, the checkpoint and diagnostics of skipped steps"""

    def __post_init__(self):
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)                          # noqa: E731
        for name in ("route_dpo", "route_dp", "route_pp", "route_pr", "dp_label_coef", "pp_coef",
                     "pr_response_coef", "weight_decay", "max_grad_norm", "judge_timeout_s"):
            if not (number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        total = sum(self.route_probs)
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"route_dpo + route_dp + route_pp + route_pr must be 1, got {total}")
        for name in ("beta", "lr", "temperature"):
            if not (number(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name, least in (("steps", 1), ("pairs_per_step", 1), ("reuse_steps", 1), ("max_new_tokens", 1), ("max_prompt_tokens", 1),
                            ("max_completion_tokens", 1),
                            ("eval_every", 1), ("eval_prompts", 1), ("checkpoint_every", 0), ("seed", 0)):
            if not (integer(getattr(self, name)) and getattr(self, name) >= least):
                raise ValueError(f"{name} must be an integer >= {least}, got {getattr(self, name)!r}")
        for name, choices in self.choices().items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("cudagraph_isolation", "gradient_checkpointing", "cudnn_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (number(self.public_hook_scale) and self.public_hook_scale > 0):
            raise ValueError(f"public_hook_scale must be a finite number > 0, got {self.public_hook_scale!r}")
        if self.checkpoint_every % self.reuse_steps:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be a multiple of reuse_steps="
                             f"{self.reuse_steps}: a run resumes at the start of a round")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir must be a non-empty string, got {self.output_dir!r}")
        uses_response_term = (self.route_pr > 0 and self.pr_response_coef > 0) or (self.route_pp > 0 and self.pp_coef > 0)
        if self.temperature != 1.0 and uses_response_term and self.response_mode == "exact":
            warnings.warn(f"temperature={self.temperature} samples from a tempered policy, not pi_theta: the "
                          "exact response term (and the eval KL estimate) assume temperature 1", stacklevel=3)

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        """{field: its allowed values} for every multiple-choice field (from its Literal type)."""
        hints = typing.get_type_hints(cls)
        return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
                if typing.get_origin(hints[f.name]) is Literal}

    # ---- the routes ---------------------------------------------------------------------
    @property
    def route_probs(self) -> list[float]:
        """[P(dpo), P(dp), P(pp), P(pr)], in the order of ``ROUTES``."""
        return [self.route_dpo, self.route_dp, self.route_pp, self.route_pr]

    def coefficients(self, route_ids: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair (response_coef, label_coef) for pairs of the given routes (indices into ROUTES)."""
        response = torch.tensor([0.0, 0.0, self.pp_coef, self.pr_response_coef], dtype=dtype)
        label = torch.tensor([0.0, self.dp_label_coef, self.pp_coef, 0.0], dtype=dtype)
        device, route_ids = route_ids.device, route_ids.cpu()
        return response[route_ids].to(device), label[route_ids].to(device)

    # ---- building one -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "SAILConfig":
        """A named preset (a key of ``PRESETS``: offline-dpo, online-dpo, sail-pr, sail-pp, sail-dp, iterative-dpo)
        with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict, source: str = "") -> "SAILConfig":
        """A config from a dict of fields (unknown names are an error, naming them and the source)."""
        for old, new in RENAMED_FIELDS.items():          # deprecated names (older config.json, --set) still read
            if old in values:
                if new in values:
                    raise ValueError(f"{source + ': ' if source else ''}both {old!r} (the deprecated name) and "
                                     f"{new!r} are set; keep {new!r}")
                warnings.warn(f"{source + ': ' if source else ''}SAILConfig field {old!r} is now {new!r}", FutureWarning,
                              stacklevel=2)
                values = {(new if k == old else k): v for k, v in values.items()}
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{source + ': ' if source else ''}unknown SAILConfig field(s) {unknown}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "SAILConfig":
        """Read a run's ``config.json`` (or any JSON object of SAILConfig fields)."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable JSON config ({error})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of SAILConfig fields, got {type(values).__name__}")
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "SAILConfig":
        return dataclasses.replace(self, **changes)
