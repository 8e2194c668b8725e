r"""The SAIL objective: DPO on policy-dependent data, and the extra gradient terms.

Notation (used in every docstring of this package)
--------------------------------------------------
x        a prompt, drawn from the prompt distribution D
y        a response
l(y|x)   sequence log-prob, SUMMED over response tokens: sum_t log pi(y_t | x, y_<t)
l_ref    the same under the frozen reference policy pi_ref
h(x,y)   l(y|x) - l_ref(y|x)                      (implicit reward / beta)
z        beta * (h(x, y_w) - h(x, y_l))           (DPO logit of the pair, w = chosen)
sg[.]    stop-gradient (``.detach()``)

The bilevel problem and its reduction
-------------------------------------
upper:  max_r  E_x E_{y1,y2 ~ pi*_r} E_{(w,l) ~ P} [ log sig(r(x,y_w) - r(x,y_l)) ]
lower:  pi*_r = argmax_pi E_x [ E_{y~pi} r(x,y) - beta KL(pi || pi_ref) ]
                = pi_ref exp(r / beta) / Z_r(x)

Setting r_theta = beta * h_theta makes pi*_{r_theta} = pi_theta, and the problem becomes

    J(theta) = E_x E_{y1,y2 ~ q_theta} E_{(w,l) ~ P_.} [ log sig(z_theta) ]        (1)

where q_theta is where responses come from (the dataset, or pi_theta) and P_. who labels
them (the dataset, an external oracle P*, or the policy's own Bradley-Terry model
P_theta(w > l) = sig(z_theta)). The log-derivative trick gives

    grad J = E[ grad log sig(z) ]                                   DPO term
           + E[ log sig(z) * (grad l(y1) + grad l(y2)) ]            response term   (if q = pi_theta)
           + E[ log sig(z) * grad log sig(z) ]                      label term      (if P = P_theta)

The label term uses grad log P_theta(w > l) = grad log sig(z): the probability of the label
that was drawn is sig of the logit of the pair in the drawn orientation.

Surrogate losses
----------------
We minimise a per-pair *surrogate* whose gradient, in expectation over sampled pairs and
labels, is -grad J. With f = -log sig(z) the per-pair DPO loss:

    dpo       f                                         grad: -grad log sig(z)
    response  sg[f - b] * (l(y_w) + l(y_l))             grad: -(log sig(z) + b)(grad l_w + grad l_l)
    label     -1/2 (log sig(z))^2                       grad: -log sig(z) grad log sig(z)

b is a baseline: any quantity that does not depend on the pair it multiplies keeps the
response term unbiased, because E_{y ~ pi}[grad log pi(y)] = 0. We offer a leave-one-out
batch mean of f, which is such a quantity and lowers the variance, taken within each route
(``baseline_groups``: the bandit and the training loop group it through this one function).

Reused pairs and labels. The response term's identity E_{y ~ pi_theta}[grad log pi_theta(y)] = 0 holds only
for pairs drawn from the CURRENT policy, and a self-label (dp, pp) is itself a draw of the policy's
Bradley-Terry model P_theta(label) = sig(z_label). A pair and label drawn at an older theta_old and reused for
later steps (``reuse_steps > 1``) get the likelihood ratio of what was drawn at theta_old:

    w = [pi_theta(y1) pi_theta(y2) / (pi_old(y1) pi_old(y2))]   (policy-sampled pairs, pp and pr)
      x [P_theta(label) / P_old(label)]                           (a drawn self-label, dp and pp)
    v =  P_theta(label) / P_old(label)                            (a drawn self-label; else 1)

    dpo       sg[v] f                                E_{l ~ P_old}[v grad f] = E_{l ~ P_theta}[grad f]
    response  sg[w (f - b)] * (l(y_w) + l(y_l))       E_old[...] = E_theta[...]
    label     sg[w] * -1/2 (log sig(z))^2             E_old[...] = E_theta[...]

(``importance_weights``, clipped; w = v = 1 exactly on the step that drew the pair; a label averaged out
is computed at theta, so v = 1 and w is the pair's ratio.) A judge's or the dataset's label does not depend
on theta, so v = 1 there, and the DPO term of a pair is not weighted by the pair's ratio: it has no
score-function part, a DPO term on any pair distribution with full support keeps pi* as its fixed point, and
a self-label's DPO gradient has expectation 0 on every pair once v is applied.

Variants (SAIL-PR / SAIL-PP / SAIL-DP) pick q and P; online DPO is "policy responses,
oracle labels, response coefficient 0"; offline DPO is "dataset responses, dataset labels".
Which pair gets which coefficients is the training loop's decision (``sail_min.config``):
this file is the math alone, and imports nothing but torch.

What the public SAIL code does instead (``response_mode="public"``)
------------------------------------------------------------------
The code of github.com/johnding1996/SAIL registers a tensor hook on the per-pair policy
log-probs that replaces grad_l by grad_l - coef * sg[log sig(z)] / sg[l], for l_w and l_l,
and averages the per-pair losses afterwards (the hook is not divided by the batch size).
We reproduce its gradient without hooks with the surrogate

    public    -sum_{pairs} ( sg[log sig(z) / l_w] l_w + sg[log sig(z) / l_l] l_l )

Compared with the exact response term:
  * sign: log sig(z) < 0 and l < 0, so it *raises* l_w and l_l (an SFT-like bonus on the
    sampled pair); the exact term, without a baseline, lowers the likelihood of every sampled
    pair in proportion to f = -log sig(z) (with a baseline b: those with f > b, and raises the rest);
  * scale: divided by |l|, as if l were a probability in grad p / p; and summed instead of
    averaged, i.e. batch_size x grad_accumulation_steps larger relative to the mean DPO loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

RESPONSE_MODES = ("exact", "public", "off")
IMPORTANCE_CLIP = 20.0
PUBLIC_HOOK_SCALE = 8.0
"""The public code's hook weighs per-device batch x gradient accumulation (4 x 2) times its mean against the
mean DPO term (it is divided by neither): ``sail_loss``'s and ``SAILConfig``'s default ``public_hook_scale``."""
"""the largest importance weight of a reused pair's response term (``importance_weights``)"""
BASELINES = ("none", "loo")


# --------------------------------------------------------------------------------------
# input checks: bad input gets a clear error, never NaN gradients
# --------------------------------------------------------------------------------------
def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and beta > 0 and beta == beta and beta != float("inf")):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_same_shape(check_finite: bool = True, **tensors: torch.Tensor) -> None:
    names = list(tensors)
    for name in names:
        if not isinstance(tensors[name], torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensors[name]).__name__}")
    shape = tensors[names[0]].shape
    for name in names:
        t = tensors[name]
        if t.shape != shape:
            raise ValueError(
                f"shape mismatch: {names[0]} has shape {tuple(shape)} but {name} has {tuple(t.shape)}"
            )
        if check_finite and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).nonzero()[0].tolist()
            raise ValueError(f"{name} has a non-finite value at index {bad}: {t[tuple(bad)].item()}")


# --------------------------------------------------------------------------------------
# implicit reward and the DPO logit
# --------------------------------------------------------------------------------------
def implicit_reward(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    r"""r_theta(x, y) = beta * (l_theta(y|x) - l_ref(y|x)), one value per sequence.

    Both inputs are SUMMED sequence log-probs (see ``sail_min.logprobs``). The partition
    function beta * log Z(x) is dropped: it cancels in every pairwise difference.
    """
    _check_beta(beta)
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps)
    return beta * (policy_logps - ref_logps)


def dpo_logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    check_finite: bool = True,
) -> torch.Tensor:
    r"""z = beta * ((l_w - l_ref,w) - (l_l - l_ref,l)), one logit per pair.

    ``check_finite=False`` lets a non-finite log-prob through (a training loop that skips
    non-finite steps wants the loss, not an exception)."""
    _check_beta(beta)
    _check_same_shape(
        check_finite,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    return beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))


# --------------------------------------------------------------------------------------
# the three surrogate terms, per pair
# --------------------------------------------------------------------------------------
def dpo_loss(z: torch.Tensor) -> torch.Tensor:
    r"""f = -log sig(z) per pair (``F.logsigmoid`` is stable: f(100) ~ 4e-44, f(-100) = 100)."""
    return -F.logsigmoid(z)


def loo_baseline(values: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    r"""Leave-one-out mean: b_i = (sum_{j != i, g_j = g_i} v_j) / (n_{g_i} - 1).

    b_i does not depend on pair i, so subtracting it from pair i's score-function weight
    keeps the estimator unbiased. A group with a single member gets b_i = 0.
    ``groups`` (optional, integer ids, e.g. the prompt index) restricts the mean to a group.
    """
    values = values.detach()
    if groups is None:
        groups = torch.zeros_like(values, dtype=torch.long)
    if groups.shape != values.shape:
        raise ValueError(f"groups has shape {tuple(groups.shape)}, values {tuple(values.shape)}")
    _, inverse = torch.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    group_sum = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    group_n = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, inverse, torch.ones_like(values)
    )
    others = group_n[inverse] - 1
    return torch.where(others > 0, (group_sum[inverse] - values) / others.clamp(min=1), torch.zeros_like(values))


def baseline_groups(routes: torch.Tensor, runs: torch.Tensor | None = None) -> torch.Tensor:
    r"""Group ids of the leave-one-out baseline: one group per route (and per run).

    b_i = mean of f over the other pairs of pair i's route in the same step (``loo_baseline``). A
    route's pairs share a source (the dataset, or fresh policy samples) and a label source, so a
    route's mean loss is the natural baseline of its score-function term; pooling routes mixes dataset
    pairs into a policy pair's baseline. ``runs`` (optional, same shape): independent runs stacked in
    one batch (the bandit's seeds), which never share a baseline. Used by ``bandit.batch_loss`` and
    ``train.pair_loss`` alike."""
    if runs is None:
        runs = torch.zeros_like(routes)
    if runs.shape != routes.shape:
        raise ValueError(f"runs has shape {tuple(runs.shape)}, routes {tuple(routes.shape)}")
    key = runs.flatten().long() * (int(routes.max()) + 1 if routes.numel() else 1) + routes.flatten().long()
    return torch.unique(key, return_inverse=True)[1].view(routes.shape)    # one id per (run, route)


def importance_weights(policy_logps: torch.Tensor, old_logps: torch.Tensor, clip: float = IMPORTANCE_CLIP) -> torch.Tensor:
    r"""w = min(exp(policy_logps - old_logps), clip), detached, per pair: a clipped likelihood ratio.

    For a reused pair, ``policy_logps`` = l_theta(y1) + l_theta(y2) now and ``old_logps`` the same at the step
    that drew the pair (w = exp(0) = 1 there); for a reused self-label, log P_theta(label) and log P_old(label)
    (``routes.route_loss`` multiplies the two ratios). Without the clip, E_{y ~ pi_old}[w g(y)] =
    E_{y ~ pi_theta}[g(y)] for any g: the reused pair's term has the expectation of a fresh pair's.

    The clip bounds the variance a rare pair adds when the policy has moved far from pi_old (a sequence-level
    ratio is a product over tokens and can be huge in an LM), and it BIASES the term: E[min(w, c) g] differs
    from E[w g] by E[(w - c)_+ g], which can be large even when few weights are clipped, because the clipped
    weights carry much of the mass. Training counts the clipped weights (``bandit.train_sampled``:
    ``clipped_weights``), and the bandit measures the bias exactly (``bandit.clip_bias``); at small label
    budgets, where one round is reused for hundreds of steps, it is large, and those points are marked."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip!r}")
    return torch.exp(policy_logps.detach() - old_logps.detach()).clamp(max=clip)


def response_term(
    z: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    baseline: str | torch.Tensor = "none",
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Score-function surrogate for responses sampled from pi_theta, per pair.

        sg[f - b] * (l(y_w) + l(y_l)),     f = -log sig(z)

    whose gradient, in expectation over y1, y2 ~ pi_theta, is -E[log sig(z) grad(l1 + l2)].
    ``baseline``: "none" (b = 0), "loo" (leave-one-out batch mean of f, within ``groups``),
    or a tensor of per-pair baselines that must not depend on the pair itself.
    """
    weight = dpo_loss(z).detach()
    return _response_surrogate(weight, policy_chosen_logps, policy_rejected_logps, _baseline(weight, baseline, groups))


def _baseline(weight: torch.Tensor, baseline: str | torch.Tensor = "none",
              groups: torch.Tensor | None = None) -> torch.Tensor:
    """The per-pair baseline b of ``response_term``: 0, the leave-one-out mean within groups, or given."""
    if isinstance(baseline, torch.Tensor):
        return baseline.detach().expand_as(weight)
    if baseline == "loo":
        return loo_baseline(weight, groups)
    if baseline == "none":
        return torch.zeros_like(weight)
    raise ValueError(f"baseline must be one of {BASELINES} or a tensor, got {baseline!r}")


def _response_surrogate(weight: torch.Tensor, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                        b: torch.Tensor) -> torch.Tensor:
    """sg[weight - b] * (l(y_w) + l(y_l))."""
    return (weight.detach() - b.detach()) * (policy_chosen_logps + policy_rejected_logps)


def label_term(z: torch.Tensor) -> torch.Tensor:
    r"""Surrogate for labels drawn from the policy's own Bradley-Terry model, per pair.

        -1/2 (log sig(z))^2,   gradient  -log sig(z) * grad log sig(z)

    In expectation over the label (w > l with probability sig(z)) its gradient is the
    gradient of the binary entropy H(sig(z)) (checked in ``tests/test_bandit.py``), so
    minimising it lowers H: it sharpens the model's own preferences.
    """
    return -0.5 * F.logsigmoid(z) ** 2


def public_code_response_term(
    z: torch.Tensor, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor
) -> torch.Tensor:
    r"""What the public SAIL code's gradient hook does, as a surrogate (per pair, NOT averaged).

        -( sg[log sig(z) / l_w] * l_w + sg[log sig(z) / l_l] * l_l )

    d/dl_w = -log sig(z) / l_w, exactly the hook's ``grad - coef * logsig / logp`` for the
    loss. See the module docstring for the sign and scale differences to ``response_term``.
    """
    logsig = F.logsigmoid(z).detach()
    return -(logsig / policy_chosen_logps.detach() * policy_chosen_logps
             + logsig / policy_rejected_logps.detach() * policy_rejected_logps)


# --------------------------------------------------------------------------------------
# the SAIL loss: one call, each term kept separately for logging
# --------------------------------------------------------------------------------------
@dataclass
class SAILLoss:
    """Per-pair loss terms (each shape [n_pairs]) and the scalar to minimise.

    ``loss = mean(dpo + response_coef * response + label_coef * label)`` (or a weighted sum)
            ``+ public_hook_scale * mean(response_coef * public)`` (public mode only).
    ``parts`` holds the three summands of ``loss`` ("dpo", "response", "label"), with gradient, so
    that each term's gradient can be measured on its own.
    """

    loss: torch.Tensor
    parts: dict
    z: torch.Tensor
    dpo: torch.Tensor
    response: torch.Tensor
    label: torch.Tensor
    chosen_rewards: torch.Tensor
    """beta * (l_w - l_ref,w), detached (the implicit reward of the chosen responses)"""
    rejected_rewards: torch.Tensor
    """beta * (l_l - l_ref,l), detached"""
    baseline: torch.Tensor | None = None
    """the baseline b of each pair's exact response term (0 in other modes), detached"""


def _as_coef(coef: float | torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    coef = torch.as_tensor(coef, dtype=like.dtype, device=like.device)
    if coef.ndim not in (0, 1) or (coef.ndim == 1 and coef.shape != like.shape):
        raise ValueError(f"{name} must be a number or a tensor of shape {tuple(like.shape)}, got {tuple(coef.shape)}")
    if not torch.isfinite(coef).all() or (coef < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {coef.tolist()}")
    return coef.expand_as(like)


def binary_entropy(z: torch.Tensor) -> torch.Tensor:
    r"""H(sig(z)) = -sig(z) log sig(z) - sig(-z) log sig(-z), in nats, per pair (stable for any z).

    The expected DPO loss of a pair whose label is drawn from the policy's own Bradley-Terry model:
    E_{l ~ sig(z)}[-log sig(z_l)] = H(sig(z)), where z_l = z if y1 wins and -z otherwise."""
    p = torch.sigmoid(z)
    return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))


def expected_label_terms(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(dpo, label) surrogates of a self-labelled pair with the label averaged out exactly.

    z is the logit in the pair's own order (y1 vs y2), and P_theta(y1 wins) = sig(z). Over the label,
        E[grad f(z_l)]                           = sig(z)(1-sig(z)) - (1-sig(z))sig(z) = 0
        E[-log sig(z_l) grad log sig(z_l)]       = grad H(sig(z))
    so the DPO term keeps its expected value sg[H] with no gradient, and the label term becomes H itself:
    minimising it sharpens the policy's own preferences, with none of the sampled label's noise."""
    entropy = binary_entropy(z)
    return entropy.detach(), entropy


def sail_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    response_coef: float | torch.Tensor = 0.0,
    label_coef: float | torch.Tensor = 0.0,
    response_mode: str = "exact",
    baseline: str | torch.Tensor = "loo",
    groups: torch.Tensor | None = None,
    public_hook_scale: float = PUBLIC_HOOK_SCALE,
    weights: torch.Tensor | None = None,
    expected_labels: torch.Tensor | None = None,
    check_finite: bool = True,
    response_importance: torch.Tensor | None = None,
    label_importance: torch.Tensor | None = None,
) -> SAILLoss:
    r"""The SAIL surrogate for a batch of labelled pairs.

    Coefficients may be numbers or per-pair tensors, so one batch can mix variants: give
    ``response_coef > 0`` only to pairs whose responses were sampled from the policy, and
    ``label_coef > 0`` only to pairs labelled by the policy's implicit reward.
    ``response_mode``: "exact" (the derivation), "public" (the public code's hook), "off".
    ``public_hook_scale``: the weight of the mean public term relative to the mean DPO term. The
    public code's hook is divided neither by the batch size nor by gradient accumulation, so in its
    training step this is per-device batch x accumulation steps (4 x 2 = 8 in its defaults:
    ``PUBLIC_HOOK_SCALE``, also ``SAILConfig``'s default).
    ``expected_labels`` (bool per pair): pairs whose label comes from the policy's own model and is
    averaged out exactly (``expected_label_terms``) instead of drawn; pass them in their own order
    (y1 as "chosen"). Their response-term weight is the expected DPO loss H(sig(z)).
    ``weights`` (per pair, default 1/n_pairs: the batch mean) replace the mean by
    sum_i weights_i * term_i, e.g. probabilities when enumerating pairs exactly, or 1/n_s
    for pairs of independent runs s stacked in one batch; they weigh the public term too.
    ``check_finite=False``: a non-finite log-prob gives a non-finite loss instead of an error.
    ``response_importance`` (per pair, default 1): the importance weight w of a reused pair and label
    (``importance_weights``: the ratio of everything drawn at the older step, see the module docstring),
    multiplying its exact response term, sg[w (f - b)] (l_w + l_l), and its label term.
    ``label_importance`` (per pair, default 1): v = P_theta(label) / P_old(label) of a reused self-label,
    multiplying its DPO term.
    """
    if response_mode not in RESPONSE_MODES:
        raise ValueError(f"response_mode must be one of {RESPONSE_MODES}, got {response_mode!r}")
    if not (isinstance(public_hook_scale, (int, float)) and public_hook_scale > 0):
        raise ValueError(f"public_hook_scale must be a number > 0, got {public_hook_scale!r}")
    z = dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                   check_finite)
    if z.ndim != 1 or z.numel() == 0:
        raise ValueError(f"expected one log-prob per pair (a non-empty 1-D tensor), got shape {tuple(z.shape)}")
    if weights is None:
        weights = torch.full_like(z, 1.0 / z.numel())
    elif weights.shape != z.shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)}, expected {tuple(z.shape)}")
    response_coef = _as_coef(response_coef, z, "response_coef")
    label_coef = _as_coef(label_coef, z, "label_coef")

    dpo = dpo_loss(z)                                                    # -log sig(z)
    label = label_term(z)                                                # -1/2 log sig(z)^2
    response_weight = dpo.detach()                                       # f: what the response term weighs
    if expected_labels is not None and bool(expected_labels.any()):
        expected = expected_labels.to(z.device)
        expected_dpo, expected_label = expected_label_terms(z)           # sg[H(sig z)], H(sig z)
        dpo, label = torch.where(expected, expected_dpo, dpo), torch.where(expected, expected_label, label)
        response_weight = torch.where(expected, expected_dpo, response_weight)
    for name, importance in (("response_importance", response_importance), ("label_importance", label_importance)):
        if importance is not None and importance.shape != z.shape:
            raise ValueError(f"{name} has shape {tuple(importance.shape)}, expected {tuple(z.shape)}")
    dpo_weight = weights if label_importance is None else weights * label_importance.detach()         # sg[v] f
    label_weight = weights if response_importance is None else weights * response_importance.detach()  # sg[w]
    parts = {"dpo": (dpo_weight * dpo).sum(), "label": (label_weight * label_coef * label).sum()}
    b = torch.zeros_like(z)
    if response_mode == "exact":
        b = _baseline(response_weight, baseline, groups)
        response = _response_surrogate(response_weight, policy_chosen_logps, policy_rejected_logps, b)
        if response_importance is not None:
            response = response_importance.detach() * response              # sg[w (f - b)] (l_w + l_l)
        parts["response"] = (weights * response_coef * response).sum()
    elif response_mode == "public":
        response = public_code_response_term(z, policy_chosen_logps, policy_rejected_logps)
        parts["response"] = public_hook_scale * (weights * response_coef * response).sum()    # default weights: the mean
    else:
        response = torch.zeros_like(z)
        parts["response"] = z.new_zeros(())
    loss = parts["dpo"] + parts["response"] + parts["label"]
    return SAILLoss(loss=loss, parts=parts, z=z.detach(), dpo=dpo.detach(), response=response.detach(),
                    label=label.detach(), baseline=b,
                    chosen_rewards=beta * (policy_chosen_logps - ref_chosen_logps).detach(),
                    rejected_rewards=beta * (policy_rejected_logps - ref_rejected_logps).detach())
