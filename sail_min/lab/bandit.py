r"""An exactly solvable toy: a contextual bandit with a tabular softmax policy.

M prompts x, K responses y per prompt, policy pi_theta(y|x) = softmax(theta[x])_y, a fixed
reference pi_ref = softmax(ref_logits[x]) and a known true reward r*(x, y). Here a
"sequence log-prob" is just l_theta(y|x) = log pi_theta(y|x), and everything the LM setting
can only estimate can be computed exactly by enumerating all K x K pairs and both labels:

  * the optimum of KL-regularised reward maximisation, in closed form
        pi*(y|x) = softmax(log pi_ref(y|x) + r*(x,y) / beta)
  * the single-level SAIL objective of every kind of pair (see ``config.ROUTES``)
        J(theta) = mean_x sum_{i,j} q(i,j|x) [ P(i>j) log sig(z_ij) + P(j>i) log sig(z_ji) ]
    with q = pi_theta x pi_theta (policy pairs) or a fixed pair distribution (dataset
    pairs), P = the oracle sig(r*_i - r*_j), the dataset's labels, or the policy's own
    Bradley-Terry model sig(z_ij), and z_ij = beta * (h_i - h_j), h = log pi_theta - log pi_ref;
  * the exact expectation of the surrogate gradient of ``objective.sail_loss``.

``train_sampled`` runs the finite-sample algorithms (batches of sampled pairs, Adam) for several
seeds at once; ``sail_min.lab.check`` compares the exact quantities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import SAILConfig
from ..objective import IMPORTANCE_CLIP, sail_loss
from ..routes import LABELS_FROM, RESPONSES_FROM, ROUTES, route_loss

@dataclass
class Bandit:
    """The problem: true reward, reference logits and beta (tensors of shape [M, K])."""

    true_reward: torch.Tensor
    ref_logits: torch.Tensor
    beta: float

    @property
    def n_prompts(self) -> int:
        return self.true_reward.shape[0]

    @property
    def n_responses(self) -> int:
        return self.true_reward.shape[1]

    @property
    def log_ref(self) -> torch.Tensor:
        """log pi_ref(y|x), shape [M, K]."""
        return torch.log_softmax(self.ref_logits, dim=-1)

    @property
    def optimal_logits(self) -> torch.Tensor:
        """log pi*(y|x) up to a constant: log pi_ref + r* / beta (closed form of the lower level)."""
        return self.log_ref + self.true_reward / self.beta

    @property
    def oracle_prefs(self) -> torch.Tensor:
        """P*(i > j | x) = sig(r*(x,i) - r*(x,j)), Bradley-Terry with the true reward, [M, K, K]."""
        r = self.true_reward
        return torch.sigmoid(r[:, :, None] - r[:, None, :])


def make_bandit(n_prompts=8, n_responses=6, beta=0.5, ref_scale=1.0, seed=0, dtype=torch.float64) -> Bandit:
    """A random problem: r* ~ N(0, 1), reference logits ~ ref_scale * N(0, 1) (peaked if large)."""
    if n_prompts < 1 or n_responses < 2:
        raise ValueError(f"need n_prompts >= 1 and n_responses >= 2, got {n_prompts}, {n_responses}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    g = torch.Generator().manual_seed(seed)
    true_reward = torch.randn(n_prompts, n_responses, generator=g, dtype=dtype)
    ref_logits = ref_scale * torch.randn(n_prompts, n_responses, generator=g, dtype=dtype)
    return Bandit(true_reward, ref_logits, beta)


# --------------------------------------------------------------------------------------
# policy quantities
# --------------------------------------------------------------------------------------
def kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """mean_x KL(p(.|x) || q(.|x)) for logits of shape [..., M, K] (returns shape [...])."""
    log_p, log_q = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1)


def expected_reward(theta: torch.Tensor, bandit: Bandit) -> torch.Tensor:
    """mean_x E_{y ~ pi_theta}[r*(x, y)] for theta of shape [..., M, K]."""
    return (torch.softmax(theta, -1) * bandit.true_reward).sum(-1).mean(-1)


def pair_logits(theta: torch.Tensor, bandit: Bandit) -> torch.Tensor:
    """z_ij = beta * (h_i - h_j), h = log pi_theta - log pi_ref, shape [M, K, K]."""
    h = torch.log_softmax(theta, -1) - bandit.log_ref
    return bandit.beta * (h[:, :, None] - h[:, None, :])


def reference_pair_probs(bandit: Bandit) -> torch.Tensor:
    """A dataset whose pairs are two independent reference samples: q(i,j|x) = pi_ref(i) pi_ref(j)."""
    p = bandit.log_ref.exp()
    return p[:, :, None] * p[:, None, :]


# --------------------------------------------------------------------------------------
# exact single-level objective of each route, by enumeration
# --------------------------------------------------------------------------------------
def _pair_and_label_probs(theta, bandit, route, dataset_pair_probs, dataset_label_probs):
    """q(i,j|x) and P(i > j|x), [M, K, K] each, as functions of theta where they depend on it."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if RESPONSES_FROM[route] == "policy":
        p = torch.softmax(theta, -1)
        q = p[:, :, None] * p[:, None, :]
    else:
        q = reference_pair_probs(bandit) if dataset_pair_probs is None else dataset_pair_probs
    labels = LABELS_FROM[route]
    if labels == "policy":
        prefs = torch.sigmoid(pair_logits(theta, bandit))
    elif labels == "judge" or dataset_label_probs is None:
        prefs = bandit.oracle_prefs
    else:
        prefs = dataset_label_probs
    return q, prefs


def exact_objective(theta, bandit, route, dataset_pair_probs=None, dataset_label_probs=None) -> torch.Tensor:
    r"""J(theta) = mean_x sum_ij q(i,j|x) [P(i>j) log sig(z_ij) + (1 - P(i>j)) log sig(-z_ij)].

    Differentiable in theta through z, through q (policy responses) and through P (policy
    labels): autograd on this is the *true* gradient of the single-level objective.
    Dataset pairs default to two reference samples labelled by the oracle.
    """
    q, prefs = _pair_and_label_probs(theta, bandit, route, dataset_pair_probs, dataset_label_probs)
    z = pair_logits(theta, bandit)
    per_pair = prefs * F.logsigmoid(z) + (1 - prefs) * F.logsigmoid(-z)
    return (q * per_pair).sum((-1, -2)).mean()


def exact_surrogate_loss(theta, bandit, route, response_coef=1.0, label_coef=1.0, baseline="none",
                         dataset_pair_probs=None, dataset_label_probs=None) -> torch.Tensor:
    r"""E[sail_loss] over every (x, y1, y2, label), weighted by its probability (held fixed).

    Its gradient is the exact expectation of the surrogate gradient that ``train_sampled`` estimates
    from samples. ``baseline`` may be "none" or a tensor [M] (one value per prompt).
    Extra terms that do not apply to the route get coefficient 0.
    """
    M, K = bandit.n_prompts, bandit.n_responses
    with torch.no_grad():
        q, prefs = _pair_and_label_probs(theta, bandit, route, dataset_pair_probs, dataset_label_probs)
    x, i, j = torch.meshgrid(torch.arange(M), torch.arange(K), torch.arange(K), indexing="ij")
    # label "i wins" with probability P(i>j), label "j wins" with 1 - P(i>j)
    prompt = torch.cat([x.flatten(), x.flatten()])
    chosen = torch.cat([i.flatten(), j.flatten()])
    rejected = torch.cat([j.flatten(), i.flatten()])
    weight = torch.cat([(q * prefs).flatten(), (q * (1 - prefs)).flatten()]) / M

    log_pi = torch.log_softmax(theta, -1)
    if RESPONSES_FROM[route] == "dataset":
        response_coef = 0.0
    if LABELS_FROM[route] != "policy":
        label_coef = 0.0
    if isinstance(baseline, torch.Tensor):
        baseline = baseline[prompt]
    return sail_loss(
        log_pi[prompt, chosen], log_pi[prompt, rejected],
        bandit.log_ref[prompt, chosen], bandit.log_ref[prompt, rejected],
        bandit.beta, response_coef=response_coef, label_coef=label_coef,
        baseline=baseline, weights=weight,
    ).loss


# --------------------------------------------------------------------------------------
# finite-sample training, several seeds at once
# --------------------------------------------------------------------------------------
def sample_offline_dataset(bandit: Bandit, pairs_per_prompt: int, n_seeds: int, generator) -> tuple:
    """A fixed dataset per seed: two reference samples per pair, labelled by an oracle
    Bradley-Terry draw. Returns (chosen, rejected), long tensors [S, M, D]."""
    S, M, D = n_seeds, bandit.n_prompts, pairs_per_prompt
    ref = bandit.log_ref.exp().repeat(S, 1)                                     # [S*M, K]
    y = torch.multinomial(ref, 2 * D, replacement=True, generator=generator).view(S, M, 2, D)
    return draw_labels(bandit.oracle_prefs, y[:, :, 0], y[:, :, 1], generator)


def draw_labels(prefs, y1, y2, generator):
    """chosen = y1 with probability prefs[x, y1, y2], else y2. prefs: [M,K,K] or [S,M,K,K]."""
    S, M, N = y1.shape
    prefs = prefs.expand(S, *prefs.shape[-3:])
    s, x = torch.arange(S)[:, None, None], torch.arange(M)[None, :, None]
    p_first = prefs[s, x, y1, y2]
    first_wins = torch.rand(p_first.shape, generator=generator, dtype=p_first.dtype) < p_first
    return torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)


def sample_pairs(theta, bandit: Bandit, config: SAILConfig, pairs_per_prompt: int, generator,
                 offline_chosen=None, offline_rejected=None) -> tuple:
    """Draw a labelled batch for each run: theta [S, M, K] -> (chosen, rejected, route), [S, M, N].

    Each pair is routed to dpo / dp / pp / pr with ``config.route_probs`` (see
    ``config.ROUTES``): dataset pairs are a uniform draw from the run's offline pairs
    (required when the config routes anything to the dataset), policy pairs two fresh samples
    of pi_theta; labels come from the dataset, the oracle, or the policy's Bradley-Terry model.
    """
    S, M, K = theta.shape
    N = pairs_per_prompt
    with torch.no_grad():
        route_probs = torch.tensor(config.route_probs, dtype=theta.dtype)
        route = torch.multinomial(route_probs, S * M * N, replacement=True, generator=generator).view(S, M, N)
        if offline_chosen is None:
            if config.route_dpo + config.route_dp > 0:
                raise ValueError("this config routes pairs to the dataset: pass offline_chosen/offline_rejected")
            offline_chosen = offline_rejected = torch.zeros(S, M, 1, dtype=torch.long)
        pick = torch.randint(offline_chosen.shape[-1], (S, M, N), generator=generator)
        d_chosen, d_rejected = offline_chosen.gather(2, pick), offline_rejected.gather(2, pick)
        pi = torch.softmax(theta, -1).reshape(S * M, K)
        y = torch.multinomial(pi, 2 * N, replacement=True, generator=generator).view(S, M, 2, N)
        self_prefs = torch.sigmoid(torch.stack([pair_logits(t, bandit) for t in theta]))
        options = [
            (d_chosen, d_rejected),                                          # dpo: dataset label
            draw_labels(self_prefs, d_chosen, d_rejected, generator),        # dp: relabelled data
            draw_labels(self_prefs, y[:, :, 0], y[:, :, 1], generator),      # pp: policy labels
            draw_labels(bandit.oracle_prefs, y[:, :, 0], y[:, :, 1], generator),  # pr: oracle labels
        ]
        chosen = sum(torch.where(route == k, c, 0) for k, (c, _) in enumerate(options))
        rejected = sum(torch.where(route == k, r, 0) for k, (_, r) in enumerate(options))
    return chosen, rejected, route


def batch_loss(theta, bandit: Bandit, config: SAILConfig, chosen, rejected, route, baseline=None, old_logps=None):
    """``sail_loss`` of sampled pairs [S, M, N] for S independent runs: the sum over runs of each
    run's batch mean. As in the training loop (``train.pair_loss``): the leave-one-out baseline is
    taken per route (``objective.baseline_groups``; here also per run), ``baseline`` defaults to
    ``config.baseline``, and the public-code term weighs ``config.public_hook_scale``.

    ``old_logps`` (optional): (log pi_old(chosen), log pi_old(rejected)), [S, M, N] each, at the step that
    drew each pair; a reused pair gets the importance weights of ``routes.reuse_weights`` (1 for a pair
    drawn this step).
    ``config.self_labels == "expected"``: pairs of the self-labelled routes (dp, pp) are taken as unlabelled
    pairs (chosen, rejected) = (y1, y2) and their label is averaged out exactly with the policy's
    own P(y1 > y2) = sig(z) (``objective.expected_label_terms``); other pairs keep their label."""
    S, M, N = chosen.shape
    s_idx, x_idx = torch.arange(S)[:, None, None], torch.arange(M)[None, :, None]
    log_pi = torch.log_softmax(theta, -1)
    log_ref = bandit.log_ref.expand_as(log_pi)
    if old_logps is not None:
        old_logps = tuple(t.flatten() for t in old_logps)
    return route_loss(log_pi[s_idx, x_idx, chosen], log_pi[s_idx, x_idx, rejected], log_ref[s_idx, x_idx, chosen],
                      log_ref[s_idx, x_idx, rejected], route, config, old_logps=old_logps,
                      runs=s_idx.expand(S, M, N), weights=torch.full((S * M * N,), 1.0 / (M * N), dtype=theta.dtype),
                      baseline=baseline, beta=bandit.beta)


@torch.no_grad()
def log_policy(history: dict, step: int, theta: torch.Tensor, bandit: Bandit) -> None:
    """Append the step, true reward, KL(pi || pi_ref) and KL(pi || pi*) (a number, or a list per run)."""
    history["step"].append(step)
    for key, value in (("reward", expected_reward(theta, bandit)), ("kl_ref", kl(theta, bandit.ref_logits)),
                       ("kl_opt", kl(theta, bandit.optimal_logits))):
        history[key].append(value.tolist())


def route_counts(route_probs, n: int) -> list[int]:
    """Pairs of each route in a batch of n per prompt: n * route_probs, rounded by largest remainder
    (the counts sum to n; a route with probability > 0 may still get 0 pairs in a tiny batch)."""
    raw = [p * n for p in route_probs]
    counts = [int(r) for r in raw]
    for k in sorted(range(len(raw)), key=lambda k: counts[k] - raw[k])[: n - sum(counts)]:
        counts[k] += 1
    return counts


def pass_order(n_seeds: int, n_prompts: int, pool: int, count: int, generator) -> torch.Tensor:
    """Indices into a pool of ``pool`` pairs per (run, prompt), ``count`` of them, [S, M, count]:
    shuffled passes (a fresh random permutation of the pool per pass), so every pair is used
    once per pass, and the passes follow each other without a gap."""
    passes = -(-count // pool)
    order = torch.rand(n_seeds, n_prompts, passes, pool, generator=generator).argsort(-1)
    return order.reshape(n_seeds, n_prompts, passes * pool)[..., :count]


def train_sampled(bandit: Bandit, config: SAILConfig, n_seeds=3, steps=1000, pairs_per_prompt=16,
                  offline_pairs_per_prompt=4, lr=0.05, eval_every=10, seed=0, *, online_pairs_per_prompt=None,
                  reuse_steps=1, importance_weighting=True) -> dict:
    r"""Adam on sampled batches of ``sail_loss``, ``n_seeds`` independent runs at once.

    Each step takes ``pairs_per_prompt`` pairs per prompt, split between the routes in fixed
    numbers (``route_counts`` of ``config.route_probs``), from three sources:

    * **dataset pairs** (routes dpo, dp): a fixed dataset of ``offline_pairs_per_prompt`` pairs
      per prompt (two reference samples, oracle Bradley-Terry label), read in shuffled passes;
    * **oracle-labelled policy pairs** (route pr), in *rounds*: every ``reuse_steps`` steps a
      round draws fresh pairs from the current policy and has the oracle label them; the
      round's steps read them in shuffled passes (label reuse, like the public code's
      ``generation_num_batches`` or iterative DPO). ``online_pairs_per_prompt`` is the total
      over the run, split as evenly as possible between the ceil(steps / reuse_steps) rounds
      (default: one step's worth per round, i.e. with ``reuse_steps=1`` fresh pairs each step);
    * **self-labelled policy pairs** (route pp): two fresh samples each step (labels are free).

    Self-labelled pairs (dp, pp) get a label drawn from the policy's sig(z), or, with
    ``config.self_labels == "expected"``, the label averaged out exactly (``objective.expected_label_terms``).

    A reused oracle-labelled pair was drawn from an older policy pi_old: its response term gets the
    importance weight pi_theta / pi_old of the pair (``objective.importance_weights``), so that its
    expectation is the current policy's; ``importance_weighting=False`` leaves it unweighted (biased,
    kept to measure the bias). Weights above the clip are counted in ``clipped_weights``, and the clip's bias on
    the exact expected response term (``clip_bias``) is summed over the steps, per run, in ``clip_bias`` beside
    the size of the term itself (``response_term_size``).

    Oracle labels are counted: 2 per labelled pair (the judge scores both responses), the
    dataset's included when the config routes any pair to it. Runs start at pi_ref and differ
    in their dataset and every sample. A run whose gradient is not finite skips that step
    (weights and Adam state untouched); skips are counted per run. Returns lists: the steps,
    per run the true reward, KL(pi || pi_ref), KL(pi || pi*) every ``eval_every`` steps, the
    oracle labels per prompt spent by each of those steps, and the totals.
    """
    if not (isinstance(reuse_steps, int) and reuse_steps >= 1):
        raise ValueError(f"reuse_steps must be an integer >= 1, got {reuse_steps!r}")
    g = torch.Generator().manual_seed(seed)
    S, M, K = n_seeds, bandit.n_prompts, bandit.n_responses
    b_dpo, b_dp, b_pp, b_pr = route_counts(config.route_probs, pairs_per_prompt)
    b_data = b_dpo + b_dp
    labels = 0                                                           # oracle labels per prompt
    if b_data:
        if offline_pairs_per_prompt < 1:
            raise ValueError("this config routes pairs to the dataset: offline_pairs_per_prompt must be >= 1")
        data_chosen, data_rejected = sample_offline_dataset(bandit, offline_pairs_per_prompt, S, g)
        data_order = pass_order(S, M, offline_pairs_per_prompt, steps * b_data, g).view(S, M, steps, b_data)
        labels += 2 * offline_pairs_per_prompt
    n_rounds = -(-steps // reuse_steps)
    if b_pr:
        online = b_pr * n_rounds if online_pairs_per_prompt is None else online_pairs_per_prompt
        if online < n_rounds:
            raise ValueError(f"{online} online pairs per prompt cannot fill {n_rounds} rounds "
                             f"(steps={steps}, reuse_steps={reuse_steps})")
    runs = [bandit.ref_logits.clone().requires_grad_(True) for _ in range(S)]   # one tensor per run,
    opt = torch.optim.Adam(runs, lr=lr)                                          # so a run can skip alone
    history = {"step": [], "reward": [], "kl_ref": [], "kl_opt": [], "labels": [], "skipped_steps": [0] * S,
               "clipped_weights": 0, "clip_bias": [0.0] * S, "response_term_size": [0.0] * S}
    s_idx, x_idx = torch.arange(S)[:, None, None], torch.arange(M)[None, :, None]
    route = torch.cat([torch.full((b,), k) for k, b in enumerate((b_dpo, b_dp, b_pp, b_pr))]).expand(S, M, -1)
    rounds_done = 0
    for step in range(steps + 1):
        theta = torch.stack(runs)
        if step % eval_every == 0 or step == steps:
            log_policy(history, step, theta, bandit)
            history["labels"].append(labels)
        if step == steps:
            break
        with torch.no_grad():
            parts = []
            if b_data:
                pick = data_order[:, :, step]
                d_chosen, d_rejected = data_chosen.gather(2, pick), data_rejected.gather(2, pick)
                parts.append((d_chosen[..., :b_dpo], d_rejected[..., :b_dpo]))
                if b_dp:
                    c, r = d_chosen[..., b_dpo:], d_rejected[..., b_dpo:]
                    parts.append((c, r) if config.self_labels == "expected" else
                                 draw_labels(_self_prefs(theta, bandit), c, r, g))
            if b_pp:
                y = _policy_samples(theta, 2 * b_pp, g).view(S, M, 2, b_pp)
                parts.append((y[:, :, 0], y[:, :, 1]) if config.self_labels == "expected" else
                             draw_labels(_self_prefs(theta, bandit), y[:, :, 0], y[:, :, 1], g))
            if b_pr:
                if step % reuse_steps == 0:                              # a new round: draw and label
                    n = online // n_rounds + (rounds_done < online % n_rounds)
                    y = _policy_samples(theta, 2 * n, g).view(S, M, 2, n)
                    pool_chosen, pool_rejected = draw_labels(bandit.oracle_prefs, y[:, :, 0], y[:, :, 1], g)
                    pool_old = _response_logps(theta, pool_chosen), _response_logps(theta, pool_rejected)
                    theta_old = theta.detach().clone()                           # pi_old: the round's label step
                    k = min(reuse_steps, steps - step)
                    pool_order = pass_order(S, M, n, k * b_pr, g).view(S, M, k, b_pr)
                    labels += 2 * n
                    rounds_done += 1
                pick = pool_order[:, :, step % reuse_steps]
                parts.append((pool_chosen.gather(2, pick), pool_rejected.gather(2, pick)))
            chosen = torch.cat([c for c, _ in parts], -1)
            rejected = torch.cat([r for _, r in parts], -1)
            old_logps = None                                                     # every pair drawn now: w = 1
            if b_pr and importance_weighting and reuse_steps > 1:
                old_logps = _response_logps(theta, chosen), _response_logps(theta, rejected)
                reused = slice(b_dpo + b_dp + b_pp, None)
                for old, pool in zip(old_logps, pool_old):
                    old[..., reused] = pool.gather(2, pick)                      # reused pairs: w = pi / pi_old
                log_w = _pair_logps(theta, chosen, rejected) - old_logps[0] - old_logps[1]
                history["clipped_weights"] += int((log_w > math.log(IMPORTANCE_CLIP)).sum())
                if config.pr_response_coef > 0 and config.response_mode == "exact":
                    bias, size = clip_bias(theta, theta_old, bandit)
                    history["clip_bias"] = [a + b for a, b in zip(history["clip_bias"], bias.tolist())]
                    history["response_term_size"] = [a + b for a, b in zip(history["response_term_size"], size.tolist())]
        opt.zero_grad()
        batch_loss(theta, bandit, config, chosen, rejected, route,
                   old_logps=old_logps).loss.backward()
        for s, run in enumerate(runs):
            if not torch.isfinite(run.grad).all():   # Adam skips a parameter whose grad is None
                run.grad = None
                history["skipped_steps"][s] += 1
        opt.step()
    history.update(labels_per_prompt=labels, optimizer_steps=steps, rounds=rounds_done if b_pr else 0,
                   reuse_steps=reuse_steps if b_pr else steps)
    return history


def clip_bias(theta: torch.Tensor, theta_old: torch.Tensor, bandit: Bandit,
              clip: float = IMPORTANCE_CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The clip's bias on the EXACT expected response term of oracle-labelled pairs drawn at theta_old and
    used at theta, per run: (|g_clip - g|, |g|), norms over all prompts and responses, [S] each.

        g      = E_{y ~ pi_theta} E_label [ (f - b) grad (l(y1) + l(y2)) ]
               = E_{y ~ pi_old}   E_label [ w (f - b) grad (l(y1) + l(y2)) ],   w = pi_theta / pi_old of the pair
        g_clip = E_{y ~ pi_old}   E_label [ min(w, clip) (f - b) grad (l(y1) + l(y2)) ]

    every pair (i, j) and label enumerated, grad_theta (l_i + l_j) = e_i + e_j - 2 pi_theta, b the
    large-batch limit of the leave-one-out baseline (the mean of f over the run's reused pairs, all prompts:
    ``objective.baseline_groups`` groups by run and route). theta, theta_old: [S, M, K]."""
    pi, old = torch.softmax(theta.detach(), -1), torch.softmax(theta_old.detach(), -1)
    q_now, q_old = pi[..., :, None] * pi[..., None, :], old[..., :, None] * old[..., None, :]      # [S, M, K, K]
    z = torch.stack([pair_logits(t, bandit) for t in theta.detach()])
    prefs = bandit.oracle_prefs
    f = prefs * -F.logsigmoid(z) + (1 - prefs) * -F.logsigmoid(-z)       # E_label f of the pair (i, j)
    b = (q_old * f).sum((-1, -2)).mean(-1)[:, None, None, None]          # [S, 1, 1, 1]

    def term(c):                                                         # sum_ij c_ij (e_i + e_j - 2 pi)
        return c.sum(-1) + c.sum(-2) - 2 * pi * c.sum((-1, -2))[..., None]

    exact = term(q_now * (f - b))                                        # q_old w = q_now, no overflow
    clipped = term(torch.minimum(q_now, clip * q_old) * (f - b))
    return (clipped - exact).flatten(1).norm(dim=1), exact.flatten(1).norm(dim=1)


def _response_logps(theta, responses):
    """log pi_theta(y) of responses [S, M, N], detached."""
    return torch.log_softmax(theta.detach(), -1).gather(2, responses)


def _pair_logps(theta, chosen, rejected):
    """log pi_theta(chosen) + log pi_theta(rejected) of pairs [S, M, N], detached."""
    log_pi = torch.log_softmax(theta.detach(), -1)
    return log_pi.gather(2, chosen) + log_pi.gather(2, rejected)


def _self_prefs(theta, bandit):
    """The policy's own Bradley-Terry preferences sig(z_ij), [S, M, K, K]."""
    return torch.sigmoid(torch.stack([pair_logits(t, bandit) for t in theta]))


def _policy_samples(theta, n, generator):
    """n samples of pi_theta per (run, prompt), [S, M, n]."""
    S, M, K = theta.shape
    return torch.multinomial(torch.softmax(theta, -1).reshape(S * M, K), n, replacement=True,
                             generator=generator).view(S, M, n)


def train_exact(bandit: Bandit, route: str, response_coef=1.0, label_coef=1.0, steps=2000, lr=0.05,
                eval_every=10) -> dict:
    """Adam on the EXACT expected surrogate gradient (no sampling noise) from pi_ref.

    With coefficient 1 on every extra term this follows grad J(theta) itself; with 0 on
    the response term of "pr" pairs, exact online DPO.
    """
    theta = bandit.ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    history = {"step": [], "reward": [], "kl_ref": [], "kl_opt": []}
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            log_policy(history, step, theta, bandit)
        if step == steps:
            break
        opt.zero_grad()
        exact_surrogate_loss(theta, bandit, route, response_coef, label_coef).backward()
        opt.step()
    return history
