"""The four kinds of pair, and the one function from a batch of routed pairs to the SAIL loss.

A SAIL run mixes four kinds of pair (the public code draws one kind per training example):

    route  responses from   label from                           extra terms       (variant)
    dpo    the dataset      the dataset                          none              offline DPO
    dp     the dataset      a draw of the policy's sig(z)        label             SAIL-DP
    pp     2 policy samples a draw of the policy's sig(z)        label + response  SAIL-PP
    pr     2 policy samples the judge (reward model, oracle)     response          SAIL-PR
                                                                 (none: online DPO)

``route_loss`` is where a pair's route becomes its loss: the coefficients of its extra terms
(``SAILConfig.coefficients``), the leave-one-out baseline within its route, the importance weight of a
reused pair, and the label averaged out for self-labelled routes. The LM loop (``train.pair_loss``) and
the exactly solvable bandit (``sail_min.lab.bandit.batch_loss``) both call it, so the bandit's exact tests
cover the LM loop's routing too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .objective import SAILLoss, baseline_groups, importance_weights, sail_loss

ROUTES = ("dpo", "dp", "pp", "pr")
"""The four kinds of pair, in the order of ``SAILConfig.route_probs``."""
RESPONSES_FROM = {"dpo": "dataset", "dp": "dataset", "pp": "policy", "pr": "policy"}
LABELS_FROM = {"dpo": "dataset", "dp": "policy", "pp": "policy", "pr": "judge"}
SELF_LABELLED = torch.tensor([LABELS_FROM[route] == "policy" for route in ROUTES])
"""Per route: is the label drawn from the policy's own Bradley-Terry model (dp, pp)?"""
POLICY_SAMPLED = torch.tensor([RESPONSES_FROM[route] == "policy" for route in ROUTES])
"""Per route: are the two responses samples of the policy (pp, pr)?"""


def route_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, routes: torch.Tensor, config: "SAILConfig", *,
               old_logps: tuple[torch.Tensor, torch.Tensor] | None = None, runs: torch.Tensor | None = None,
               weights: torch.Tensor | None = None, baseline: str | None = None, beta: float | None = None,
               check_finite: bool = True) -> SAILLoss:
    r"""``objective.sail_loss`` of labelled pairs, each with its route (an index into ``ROUTES``).

    - coefficients per pair: gamma on pr, kappa on pp (response and label term), rho on dp (label term);
    - baseline: leave-one-out mean of the pair loss over the other pairs of the same route (and the same run:
      ``runs`` numbers independent runs stacked in one batch, as the bandit's seeds); ``baseline`` overrides
      ``config.baseline``;
    - ``old_logps`` = (l_old(chosen), l_old(rejected)) at the step that drew the pair and its label (a reused
      round; the same order as ``policy_chosen``, ``policy_rejected``): every draw made at theta_old is
      importance-weighted (``objective`` module docstring, "Reused pairs and labels"), each weight clipped
      (``objective.importance_weights``):
        w = pi_theta / pi_old of the pair (pp, pr)  x  P_theta(label) / P_old(label) (a drawn self-label:
            dp, pp with ``self_labels == "sampled"``)   on the response and label terms,
        v = P_theta(label) / P_old(label) (the drawn self-label alone)                on the DPO term;
    - ``config.self_labels == "expected"``: self-labelled pairs are passed in their sampled order
      (chosen, rejected) = (y1, y2) and their label is averaged out exactly (``objective.expected_label_terms``);
    - ``weights``: per-pair weights replacing the batch mean (the bandit: 1 / pairs per run); ``beta`` overrides
      ``config.beta`` (the bandit carries its own).
    All inputs are flat per-pair tensors, or any shape that flattens to one (the bandit's [S, M, N])."""
    policy_chosen, policy_rejected = policy_chosen.flatten(), policy_rejected.flatten()
    device, routes = policy_chosen.device, routes.flatten().to(policy_chosen.device)
    coef_dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    response_coef, label_coef = (c.to(device) for c in config.coefficients(routes, coef_dtype))
    beta = config.beta if beta is None else beta
    importance = label_importance = None
    if old_logps is not None:
        importance, label_importance = reuse_weights(policy_chosen, policy_rejected, ref_chosen.flatten(),
                                                     ref_rejected.flatten(), routes, config, old_logps, beta)
    expected = SELF_LABELLED[routes.cpu()] if config.self_labels == "expected" else None
    return sail_loss(policy_chosen, policy_rejected, ref_chosen.flatten(), ref_rejected.flatten(), beta,
                     response_coef=response_coef, label_coef=label_coef, response_mode=config.response_mode,
                     baseline=config.baseline if baseline is None else baseline,
                     groups=baseline_groups(routes, None if runs is None else runs.flatten().to(device)),
                     public_hook_scale=config.public_hook_scale, weights=weights, expected_labels=expected,
                     response_importance=importance, label_importance=label_importance, check_finite=check_finite)


def reuse_weights(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, routes: torch.Tensor, config: "SAILConfig",
                  old_logps: tuple[torch.Tensor, torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(w, v) of reused pairs, clipped (``objective.importance_weights``), flat per pair:

        log w = [l_theta(y_w) + l_theta(y_l) - l_old(y_w) - l_old(y_l)]      if the route samples its responses
              + [log sig(z) - log sig(z_old)]                                if its label is a drawn self-label
        log v =  log sig(z) - log sig(z_old)                                 if its label is a drawn self-label

    z and z_old are the pair's DPO logit in its labelled order (chosen first) now and at theta_old:
    P_theta(the drawn label) = sig(z). A label averaged out is computed at theta (no ratio)."""
    old_chosen, old_rejected = (t.flatten().to(policy_chosen.device).detach() for t in old_logps)
    now_chosen, now_rejected = policy_chosen.detach(), policy_rejected.detach()
    on_route = routes.cpu()
    sampled = POLICY_SAMPLED[on_route].to(now_chosen.device)
    drawn_label = (SELF_LABELLED[on_route] & (config.self_labels == "sampled")).to(now_chosen.device)
    pair = torch.where(sampled, (now_chosen + now_rejected) - (old_chosen + old_rejected), 0.0)
    z_now = beta * ((now_chosen - ref_chosen) - (now_rejected - ref_rejected))
    z_old = beta * ((old_chosen - ref_chosen) - (old_rejected - ref_rejected))
    label = torch.where(drawn_label, F.logsigmoid(z_now) - F.logsigmoid(z_old), 0.0)
    zero = torch.zeros_like(pair)
    return importance_weights(pair + label, zero), importance_weights(label, zero)
