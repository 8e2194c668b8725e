"""Diagnostics beside the loop: per-term gradient norms, and a skipped step that explains itself.

- ``term_gradient_norms``: ||grad|| of each term of the loss on its own (logged at evaluations);
- ``explain_skipped_step``: what was non-finite in a skipped step (the loss, log-prob rows, parameter
  gradients), as metrics, with the step's inputs saved for ``train.replay_skipped_step`` (the same step
  recomputed with one setting changed at a time; it lives beside the loop whose functions it calls).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .config import SAILConfig
from .runtime import attention_kernels
from .labels import PairLabels


def term_gradient_norms(loss, policy, routes: torch.Tensor, config: SAILConfig) -> dict:
    """||grad|| of each term of the loss on its own. A term whose coefficients are all 0 has no gradient;
    when both extra terms are off the DPO term's norm is the total gradient's (filled in from the step),
    so plain DPO runs pay no extra backward pass, SAIL runs one or two."""
    response_coef, label_coef = config.coefficients(routes)
    active = {"response": bool(response_coef.any()) and config.response_mode != "off", "label": bool(label_coef.any())}
    norms = {f"grad_norm/{name}": 0.0 for name, on in active.items() if not on}
    if not any(active.values()):
        return norms                                   # grad_norm/dpo = the step's grad_norm
    params = [p for p in policy.parameters() if p.requires_grad]
    for name in ("dpo", *(name for name, on in active.items() if on)):
        with attention_kernels(config.cudnn_attention):
            grads = [g for g in torch.autograd.grad(loss.parts[name], params, retain_graph=True, allow_unused=True)
                     if g is not None]
        norms[f"grad_norm/{name}"] = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item() if grads else 0.0
    return norms


def explain_skipped_step(path: Path, pairs, logps, labels: PairLabels, loss, policy, config: SAILConfig,
                         step: int, counters: dict) -> dict:
    """What was non-finite (the loss, which log-prob rows, which parameter gradients), as metrics and a
    warning, and the step's inputs saved to ``path`` for ``train.replay_skipped_step``."""
    bad_rows = {name: (~torch.isfinite(value.detach())).nonzero().flatten().tolist()
                for name, value in vars(logps).items()}
    bad_grads = [name for name, p in policy.named_parameters()
                 if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    what = [] if bool(torch.isfinite(loss.loss)) else ["loss"]
    what += [f"{name} rows {rows[:8]}" for name, rows in bad_rows.items() if rows]
    what += [f"gradient of {len(bad_grads)} tensors, first {bad_grads[0]}"] if bad_grads else []
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "config": config.to_dict(), "routes": pairs.routes.cpu(),
                "inputs": {k: v.cpu() for k, v in pairs.model_inputs().items()},
                "first_is_chosen": labels.first_is_chosen.cpu(),
                "trainable": {n: p.detach().cpu() for n, p in policy.named_parameters() if p.requires_grad}}, path)
    what = "; ".join(what) or "gradient norm (another process's gradient, or a norm too large for float32)"
    warnings.warn(f"step {step}: non-finite loss or gradient, step skipped ({counters['skipped_steps']} so far): "
                  f"{what}; inputs saved to {path}", RuntimeWarning)
    return {"skip/what": what, "skip/nonfinite_logp_rows": bad_rows, "skip/nonfinite_grads": bad_grads[:20],
            "skip/inputs": str(path)}
