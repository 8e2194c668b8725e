"""The exactly solvable bandit: closed-form optimum, exact gradients, the two facts, training."""
import pytest
import torch

from sail_min.lab.bandit import (
    exact_objective, exact_surrogate_loss, expected_reward, kl, make_bandit, pair_logits,
    reference_pair_probs, train_sampled,
)
from sail_min.lab.check import (
    bilevel_gradient, lower_objective, monte_carlo_errors, relative_error, slope, solve_lower_level,
    surrogate_gradient, true_gradient,
)
from sail_min.config import ROUTES, SAILConfig

F64 = torch.float64


@pytest.fixture(scope="module")
def problem():
    bandit = make_bandit(n_prompts=3, n_responses=4, beta=0.6, seed=3)
    theta = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    return bandit, theta


def grad_of(fn, theta):
    theta = theta.detach().clone().requires_grad_()
    return torch.autograd.grad(fn(theta), theta)[0]


def test_closed_form_optimum_solves_the_lower_level(problem):
    bandit, _ = problem
    psi = solve_lower_level(bandit.true_reward, bandit)
    numeric = torch.softmax(torch.nn.functional.pad(psi, (0, 1)), -1)
    assert torch.allclose(numeric, torch.softmax(bandit.optimal_logits, -1), atol=1e-12)
    # and no perturbation of it does better
    best = lower_objective(psi, bandit.true_reward, bandit)
    for seed in range(5):
        noise = 0.1 * torch.randn(psi.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
        assert lower_objective(psi + noise, bandit.true_reward, bandit) < best


@pytest.mark.parametrize("route", ROUTES)
def test_surrogate_gradient_equals_true_gradient(problem, route):
    bandit, theta = problem
    assert relative_error(surrogate_gradient(theta, bandit, route), true_gradient(theta, bandit, route)) < 1e-12


@pytest.mark.parametrize("route", ["pp", "pr"])
def test_dropping_the_response_term_changes_the_gradient(problem, route):
    bandit, theta = problem
    partial = surrogate_gradient(theta, bandit, route, response_coef=0.0)
    assert relative_error(partial, true_gradient(theta, bandit, route)) > 0.05


@pytest.mark.parametrize("route", ["dp", "pp"])
def test_self_labelled_dpo_gradient_is_zero_in_expectation(problem, route):
    """Labels drawn from sig(z): E_label[grad log sig(z_label)] = sig(1-sig) - (1-sig)sig = 0."""
    bandit, theta = problem
    dpo_only = surrogate_gradient(theta, bandit, route, response_coef=0.0, label_coef=0.0)
    assert dpo_only.abs().max() < 1e-15
    oracle = surrogate_gradient(theta, bandit, "pr", response_coef=0.0)
    assert oracle.abs().max() > 1e-3  # the same term with oracle labels is not zero


@pytest.mark.parametrize("route", ["dp", "pp"])
def test_label_term_minimises_the_binary_entropy_of_own_preferences(problem, route):
    """E_label[-log sig(z) grad log sig(z)]... equals grad of E_pairs[H(sig(z))], H the binary entropy."""
    bandit, theta = problem

    def mean_entropy(t):
        p = torch.sigmoid(pair_logits(t, bandit))
        q = (torch.softmax(t, -1)[:, :, None] * torch.softmax(t, -1)[:, None, :]).detach() \
            if route == "pp" else reference_pair_probs(bandit)
        return (q * -(p * p.log() + (1 - p) * (1 - p).log())).sum((-1, -2)).mean()

    label_only = surrogate_gradient(theta, bandit, route, response_coef=0.0, label_coef=1.0)
    assert relative_error(label_only, grad_of(mean_entropy, theta)) < 1e-12
    # so a small descent step on the label term lowers the entropy
    assert mean_entropy(theta - 1e-3 * label_only) < mean_entropy(theta)


@pytest.mark.parametrize("labels,route", [("oracle", "pr"), ("policy", "pp")])
def test_bilevel_gradient_by_implicit_differentiation_matches_single_level(problem, labels, route):
    bandit, theta = problem
    g_bilevel, mismatch = bilevel_gradient(theta, bandit, labels)
    assert mismatch < 1e-12
    assert relative_error(g_bilevel, true_gradient(theta, bandit, route)) < 1e-10


def test_baseline_keeps_the_gradient_unbiased(problem):
    bandit, theta = problem
    baseline = torch.tensor([0.3, -2.0, 5.0], dtype=F64)
    with_b = grad_of(lambda t: exact_surrogate_loss(t, bandit, "pr", baseline=baseline), theta)
    assert relative_error(with_b, surrogate_gradient(theta, bandit, "pr")) < 1e-12


def test_monte_carlo_error_shrinks_like_one_over_sqrt_n(problem):
    bandit, theta = problem
    sizes = (8, 32, 128, 512)
    errors = monte_carlo_errors(theta, bandit, SAILConfig(route_dpo=0, route_pr=1, pr_response_coef=1), "pr", sizes)
    assert errors == sorted(errors, reverse=True)
    assert -0.6 < slope(sizes, errors) < -0.4


def test_exact_objective_is_maximised_by_pi_star_for_oracle_dataset_dpo():
    """Offline DPO with full coverage: pi* is a stationary point of the dataset objective."""
    bandit = make_bandit(n_prompts=3, n_responses=4, beta=0.6, seed=1)
    g = grad_of(lambda t: exact_objective(t, bandit, "dpo"), bandit.optimal_logits)
    assert g.abs().max() < 1e-12


def test_training_is_deterministic_and_online_dpo_reaches_the_optimum():
    bandit = make_bandit(n_prompts=4, n_responses=5, beta=0.5, seed=0)
    online = SAILConfig(route_dpo=0.0, route_pr=1.0)
    a = train_sampled(bandit, online, n_seeds=2, steps=300, pairs_per_prompt=32, eval_every=100)
    b = train_sampled(bandit, online, n_seeds=2, steps=300, pairs_per_prompt=32, eval_every=100)
    assert a == b
    assert a["step"] == [0, 100, 200, 300]
    optimum = expected_reward(bandit.optimal_logits, bandit).item()
    start = expected_reward(bandit.ref_logits, bandit).item()
    # online DPO closes more than 90% of the reward gap, and ends near pi* (KL(pi || pi*) small)
    assert min(a["reward"][-1]) > start + 0.9 * (optimum - start)
    assert max(a["kl_opt"][-1]) < 0.05 * kl(bandit.ref_logits, bandit.optimal_logits).item()


def test_non_finite_steps_are_skipped_and_counted():
    """The public-code term divides by log pi(y), which reaches 0 on a tabular policy."""
    bandit = make_bandit(n_prompts=16, n_responses=12, beta=0.3, ref_scale=2.0, seed=0)
    public = SAILConfig(route_dpo=0.7, route_pr=0.3, pr_response_coef=0.3, response_mode="public")
    hist = train_sampled(bandit, public, n_seeds=3, steps=400, eval_every=100)
    assert sum(hist["skipped_steps"]) > 0
    assert all(torch.isfinite(torch.tensor(v)).all() for v in hist["reward"] + hist["kl_opt"])


def test_dataset_routes_need_a_dataset():
    from sail_min.lab.bandit import sample_pairs
    bandit = make_bandit(n_prompts=2, n_responses=3)
    with pytest.raises(ValueError, match="offline_chosen"):
        sample_pairs(bandit.ref_logits[None], bandit, SAILConfig(), 4, torch.Generator())


# --------------------------------------------------------------------------------------
# equal label budgets, label reuse, expected labels
# --------------------------------------------------------------------------------------
from sail_min.lab.bandit import batch_loss, draw_labels, route_counts  # noqa: E402
from sail_min.lab.bandit_comparison import (  # noqa: E402
    BANDIT_METHODS, NAME_WIDTH, BanditMethod, BanditSetup, format_table, plan_budget, run_bandit_comparison,
)
from sail_min.objective import sail_loss  # noqa: E402


def test_route_counts_split_a_batch_exactly():
    assert route_counts([0.7, 0.0, 0.0, 0.3], 16) == [11, 0, 0, 5]
    assert route_counts([0.6, 0.4, 0.0, 0.0], 16) == [10, 6, 0, 0]
    assert route_counts([0.0, 0.0, 0.0, 1.0], 7) == [0, 0, 0, 7]
    assert all(sum(route_counts(SAILConfig.preset(p).route_probs, n)) == n
               for p in ("offline-dpo", "sail-pr", "sail-pp", "sail-dp") for n in (1, 3, 16, 33))


@pytest.mark.parametrize("budget", [16, 64, 1024])
def test_every_method_spends_exactly_the_budget_in_the_same_number_of_steps(budget):
    bandit = make_bandit(n_prompts=3, n_responses=5, beta=0.5, seed=0)
    steps = 12
    for name, method in BANDIT_METHODS.items():
        plan = plan_budget(method, budget, steps, pairs_per_prompt=16)
        assert 2 * (plan["offline_pairs"] + plan["online_pairs"]) == budget, name
        hist = train_sampled(bandit, method.config, n_seeds=2, steps=steps, eval_every=steps,
                             offline_pairs_per_prompt=plan["offline_pairs"], online_pairs_per_prompt=plan["online_pairs"],
                             reuse_steps=plan["reuse_steps"])
        assert hist["labels_per_prompt"] == budget, name          # counted while training, not planned
        assert hist["labels"][-1] == budget and hist["optimizer_steps"] == steps, name
        assert hist["rounds"] == plan["rounds"], name
    # who spends what: offline DPO all on the dataset, online DPO all online, SAIL-PR 70/30
    assert plan_budget(BANDIT_METHODS["offline DPO"], budget, steps, 16)["online_pairs"] == 0
    assert plan_budget(BANDIT_METHODS["online DPO"], budget, steps, 16)["offline_pairs"] == 0
    pr = plan_budget(BANDIT_METHODS["SAIL-PR"], budget, steps, 16)
    assert abs(pr["offline_pairs"] - 0.7 * budget / 2) <= 0.5
    assert plan_budget(BANDIT_METHODS["SAIL-PP"], budget, steps, 16)["offline_pairs"] == budget // 2  # pp is free


def test_online_rounds_scale_with_the_budget_and_iterative_dpo_keeps_its_rounds():
    online, iterative = BANDIT_METHODS["online DPO"], BANDIT_METHODS["iterative DPO (4 rounds)"]
    assert [plan_budget(online, b, 512, 16)["rounds"] for b in (16, 64, 256, 1024, 4096)] == [1, 2, 8, 32, 128]
    assert [plan_budget(online, b, 512, 16)["reuse_steps"] for b in (16, 4096)] == [512, 4]
    assert plan_budget(iterative, 4096, 512, 16) == dict(offline_pairs=0, online_pairs=2048, rounds=4, reuse_steps=128)
    assert plan_budget(iterative, 4, 512, 16)["rounds"] == 2           # never more rounds than pairs
    with pytest.raises(ValueError, match="even"):
        plan_budget(online, 15, 10, 16)


@pytest.mark.parametrize("reuse", [1, 3, 5])
def test_label_reuse_draws_and_labels_a_round_every_reuse_steps(reuse):
    bandit = make_bandit(n_prompts=3, n_responses=5, beta=0.5, seed=0)
    online = SAILConfig.preset("online-dpo")
    steps, per_round = 11, 4
    rounds = -(-steps // reuse)
    hist = train_sampled(bandit, online, n_seeds=2, steps=steps, pairs_per_prompt=4, eval_every=1,
                         online_pairs_per_prompt=per_round * rounds, reuse_steps=reuse)
    # labels[t] = labels spent before step t: a round of 4 pairs (8 labels) starts at steps 0, reuse, 2 reuse, ...
    assert hist["labels"] == [8 * -(-t // reuse) for t in range(steps + 1)]
    assert hist["rounds"] == rounds and hist["labels_per_prompt"] == 8 * rounds
    # default: one batch of fresh pairs per round, so reuse_steps=1 is plain online DPO
    fresh = train_sampled(bandit, online, n_seeds=2, steps=steps, pairs_per_prompt=4, eval_every=steps)
    assert fresh["labels_per_prompt"] == 2 * 4 * steps
    with pytest.raises(ValueError, match="rounds"):
        train_sampled(bandit, online, steps=10, reuse_steps=1, online_pairs_per_prompt=5)


def test_reused_round_is_read_in_shuffled_passes(monkeypatch):
    """Within a round every step reads the same pool: with a pool of one batch, the same pairs."""
    import sail_min.lab.bandit as bandit_module
    seen = []
    original = bandit_module.batch_loss

    def spy(theta, bandit, config, chosen, rejected, route, **kwargs):
        seen.append(sorted(zip(chosen[0, 0].tolist(), rejected[0, 0].tolist())))
        return original(theta, bandit, config, chosen, rejected, route, **kwargs)

    monkeypatch.setattr(bandit_module, "batch_loss", spy)
    bandit = make_bandit(n_prompts=2, n_responses=6, beta=0.5, seed=0)
    train_sampled(bandit, SAILConfig.preset("online-dpo"), n_seeds=1, steps=6, pairs_per_prompt=8, reuse_steps=3,
                  online_pairs_per_prompt=16, eval_every=6)
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4] == seen[5] and seen[0] != seen[3]


@pytest.mark.parametrize("preset,coefs", [("sail-pp", dict(pp_coef=0.7)), ("sail-dp", dict(dp_label_coef=0.7)),
                                          ("sail-pp", dict(pp_coef=0.0))])
def test_expected_label_gradient_is_the_mean_of_sampled_label_gradients(preset, coefs):
    """Monte Carlo over D label draws with the pairs fixed: |mean - expected| <= 5 standard errors
    (+1e-12 for coordinates with no pair, where both are 0 up to rounding)."""
    bandit = make_bandit(n_prompts=3, n_responses=4, beta=0.6, seed=3)
    theta = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(0)
    route_id = ROUTES.index("pp" if preset == "sail-pp" else "dp")
    config = SAILConfig.preset(preset, route_dpo=0.0, **{"route_pp" if route_id == 2 else "route_dp": 1.0}, **coefs)
    N, D = 6, 20000
    y = torch.multinomial(torch.softmax(theta, -1), 2 * N, replacement=True, generator=g).view(1, 3, 2, N)
    y1, y2 = y[:, :, 0], y[:, :, 1]
    route = torch.full((1, 3, N), route_id)

    expected = grad_of(lambda t: batch_loss(t[None], bandit, config.replace(self_labels="expected"), y1, y2, route).loss,
                       theta)
    thetas = theta.expand(D, 3, 4).clone().requires_grad_()
    chosen, rejected = draw_labels(torch.sigmoid(pair_logits(theta, bandit)), y1.expand(D, -1, -1),
                                   y2.expand(D, -1, -1), g)
    batch_loss(thetas, bandit, config, chosen, rejected, route.expand(D, -1, -1)).loss.backward()
    mean, stderr = thetas.grad.mean(0), thetas.grad.std(0) / D ** 0.5
    assert ((mean - expected).abs() <= 5 * stderr + 1e-12).all()
    if coefs.get("pp_coef", 1) == 0:
        # no extra terms: self-labelled pairs carry exactly zero expected gradient, and their
        # sampled gradient is pure noise around it
        assert expected.abs().max() < 1e-15 and thetas.grad.std(0).max() > 1e-2
    else:
        assert expected.abs().max() > 20 * stderr.max()       # and the test can tell a wrong expectation


def test_expected_self_labels_are_entropy_minimisation(problem):
    """sail_loss(expected_labels=...): the DPO part's gradient is 0 and the label part's is coef x the
    gradient of the binary entropy of the policy's own preferences; the DPO value is that entropy."""
    bandit, theta = problem
    g = torch.Generator().manual_seed(1)
    y = torch.multinomial(torch.softmax(theta, -1), 10, replacement=True, generator=g)
    x = torch.arange(3)[:, None].expand(3, 5).flatten()
    y1, y2 = y[:, :5].flatten(), y[:, 5:].flatten()
    every = torch.ones(15, dtype=torch.bool)

    def pieces(t):
        lp = torch.log_softmax(t, -1)
        return lp[x, y1], lp[x, y2], bandit.log_ref[x, y1], bandit.log_ref[x, y2]

    def z_of(t):
        a, b, c, d = pieces(t)
        return bandit.beta * ((a - c) - (b - d))

    def own(t):
        return sail_loss(*pieces(t), bandit.beta, label_coef=0.3, expected_labels=every).loss

    def entropy(t):
        p = torch.sigmoid(z_of(t))
        return -(p * p.log() + (1 - p) * (1 - p).log()).mean()

    assert relative_error(grad_of(own, theta), 0.3 * grad_of(entropy, theta)) < 1e-12
    value = sail_loss(*pieces(theta), bandit.beta, expected_labels=every)
    assert torch.allclose(value.dpo, -(lambda p: p * p.log() + (1 - p) * (1 - p).log())(torch.sigmoid(value.z)))


def test_controls_zero_expected_gradient_from_self_labelled_pairs():
    """SAIL-PP's and SAIL-DP's controls: with labels averaged out, the self-labelled pairs add
    nothing; the batch gradient is that of its dataset pairs alone."""
    bandit = make_bandit(n_prompts=3, n_responses=5, beta=0.5, seed=0)
    theta = torch.randn(1, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(0)
    chosen = torch.randint(5, (1, 3, 10), generator=g)
    rejected = torch.randint(5, (1, 3, 10), generator=g)
    for name, self_route in (("SAIL-PP control (kappa=0, label averaged out)", 2),
                             ("SAIL-DP control (rho=0, label averaged out)", 1)):
        config = BANDIT_METHODS[name].config
        route = torch.tensor([0] * 7 + [self_route] * 3).expand(1, 3, 10)
        full = grad_of(lambda t: batch_loss(t, bandit, config, chosen, rejected, route).loss,   # config: averaged
                       theta)
        dataset_only = grad_of(lambda t: 0.7 * batch_loss(t, bandit, config, chosen[..., :7], rejected[..., :7],
                                                          route[..., :7]).loss, theta)
        assert relative_error(full, dataset_only) < 1e-12, name


def test_table_shows_each_variant_beside_its_control_and_the_labels_spent():
    setup = BanditSetup(n_prompts=4, n_responses=5, budgets=(16, 64), steps=6, n_seeds=2, eval_every=3)
    results = run_bandit_comparison(setup)
    table = format_table(results)
    lines = table.splitlines()
    for budget in ("16", "64"):
        block = results["by_budget"][budget]
        assert all(entry["labels_spent"] == int(budget) and entry["optimizer_steps"] == 6 for entry in block.values())
    for variant, control in (("SAIL-PR", "SAIL-PR control (gamma=0)"), ("SAIL-PP", "SAIL-PP control (kappa=0)"),
                             ("SAIL-DP", "SAIL-DP control (rho=0)"),
                             ("SAIL-PP (label averaged out)", "SAIL-PP control (kappa=0, label averaged out)"),
                             ("SAIL-DP (label averaged out)", "SAIL-DP control (rho=0, label averaged out)")):
        assert results["methods"][variant]["control"] == control
        rows = [i for i, line in enumerate(lines) if line[:NAME_WIDTH].rstrip() == variant]
        assert len(rows) == 2                                              # one per budget
        for i in rows:
            assert lines[i + 1][:NAME_WIDTH].rstrip() == control          # its control right below it
            assert lines[i].count("±") == 3 and lines[i + 1].count("±") == 3   # KL, reward, KL to pi_ref: mean ± SD
            assert " 64 " in lines[i] or " 16 " in lines[i]                # labels spent
        paired_rows = [line for line in lines if line.startswith(f"{variant} - control ")]
        assert len(paired_rows) == 4                                       # KL and reward, per budget
        assert all(("above" in r or "below" in r or "level within noise" in r) and "   2  " in r for r in paired_rows)
    assert "KL(pi||pi*)" in lines[1] and lines[1].index("KL(pi||pi*)") < lines[1].index("true reward")
    with pytest.raises(ValueError, match="control"):
        run_bandit_comparison(BanditSetup(methods={"x": BanditMethod(SAILConfig(), control="nope")}))


# --------------------------------------------------------------------------------------
# one baseline for both halves; reused pairs; the public hook's scale
# --------------------------------------------------------------------------------------
def test_bandit_and_training_loop_compute_the_same_baseline_on_a_batch_mixing_routes():
    """bandit.batch_loss and train.pair_loss on the same pairs: the same per-route leave-one-out baselines
    (one group per route, dataset and online pairs never pooled), the same loss, the same gradient."""
    from sail_min.labels import PairLabels
    from sail_min.train import PairLogps, pair_loss

    bandit = make_bandit(n_prompts=3, n_responses=5, beta=0.5, seed=0)
    # coefficients exact in float32 (the loop's coefficient dtype), so both paths use the same numbers
    config = SAILConfig(route_dpo=0.4, route_dp=0.2, route_pp=0.2, route_pr=0.2, dp_label_coef=0.25, pp_coef=0.125,
                        pr_response_coef=0.5, beta=0.5)
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(1, 3, 5, dtype=F64, generator=g)
    chosen, rejected = torch.randint(5, (1, 3, 10), generator=g), torch.randint(5, (1, 3, 10), generator=g)
    route = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 3, 3]).expand(1, 3, 10)

    t_bandit = theta.clone().requires_grad_()
    from_bandit = batch_loss(t_bandit, bandit, config, chosen, rejected, route)
    from_bandit.loss.backward()

    t_loop = theta.clone().requires_grad_()
    log_pi, x = torch.log_softmax(t_loop[0], -1), torch.arange(3)[:, None].expand(3, 10)
    logps = PairLogps(log_pi[x, chosen[0]].flatten(), log_pi[x, rejected[0]].flatten(),
                      bandit.log_ref[x, chosen[0]].flatten(), bandit.log_ref[x, rejected[0]].flatten())
    from_loop = pair_loss(logps, PairLabels(torch.ones(30, dtype=torch.bool)), route[0].flatten(), config)
    from_loop.loss.backward()

    assert torch.equal(from_bandit.baseline, from_loop.baseline)
    assert torch.allclose(from_bandit.loss, from_loop.loss, rtol=1e-14, atol=0)
    assert relative_error(t_bandit.grad, t_loop.grad) < 1e-14
    # per route: pair i's baseline is the mean loss of the OTHER pairs of its route (here: of every prompt)
    f, routes = from_bandit.dpo, route.flatten()
    for i in range(30):
        others = (routes == routes[i]) & (torch.arange(30) != i)
        assert torch.allclose(from_bandit.baseline[i], f[others].mean(), rtol=1e-14, atol=0)


def _enumerate_reused_batches(bandit, theta_old):
    """Every batch of one oracle-labelled pair per prompt drawn from pi_old, as runs [B, M, 1], with its
    probability: all (y1, y2, label) for each prompt, B = (2 K^2)^M."""
    M, K = bandit.n_prompts, bandit.n_responses
    p_old = torch.softmax(theta_old, -1)
    per_prompt = [(i, j, w) for i in range(K) for j in range(K) for w in (0, 1)]       # w = 0: i wins
    chosen, rejected, prob = [], [], []
    for combo in torch.cartesian_prod(*[torch.arange(len(per_prompt))] * M).view(-1, M).tolist():
        c, r, p = [], [], 1.0
        for x, k in enumerate(combo):
            i, j, w = per_prompt[k]
            win = bandit.oracle_prefs[x, i, j] if w == 0 else 1 - bandit.oracle_prefs[x, i, j]
            p = p * p_old[x, i] * p_old[x, j] * win
            c.append(i if w == 0 else j)
            r.append(j if w == 0 else i)
        chosen.append(c), rejected.append(r), prob.append(p)
    return (torch.tensor(chosen)[..., None], torch.tensor(rejected)[..., None], torch.stack(prob))


def test_reused_pairs_response_term_is_unbiased_with_importance_weights():
    """Pairs drawn from pi_old, trained on at theta (a reused round): the expectation over every batch of
    the response term's gradient (leave-one-out baseline, as trained) equals the exact response gradient at
    the CURRENT theta with the importance weight pi_theta / pi_old of the pair, and misses it without."""
    bandit = make_bandit(n_prompts=2, n_responses=3, beta=0.5, seed=1)
    theta_old = bandit.ref_logits.clone()
    theta = theta_old + 0.8 * torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    gamma = 0.3
    chosen, rejected, prob = _enumerate_reused_batches(bandit, theta_old)
    assert abs(prob.sum().item() - 1) < 1e-12 and len(prob) == 18 ** 2
    B = len(prob)
    route = torch.full((B, 2, 1), ROUTES.index("pr"))
    log_old = torch.log_softmax(theta_old, -1)
    old_logps = log_old[torch.arange(2)[None, :, None], chosen], log_old[torch.arange(2)[None, :, None], rejected]

    def expected_gradient(coef, weighted):
        config = SAILConfig(route_dpo=0.0, route_pr=1.0, pr_response_coef=coef)
        runs = theta.expand(B, 2, 3).clone().requires_grad_()
        batch_loss(runs, bandit, config, chosen, rejected, route, old_logps=old_logps if weighted else None).loss.backward()
        return (prob[:, None, None] * runs.grad).sum(0)          # each run's gradient, weighted by its probability

    exact = (grad_of(lambda t: exact_surrogate_loss(t, bandit, "pr", response_coef=gamma), theta)
             - grad_of(lambda t: exact_surrogate_loss(t, bandit, "pr", response_coef=0.0), theta))
    weighted = expected_gradient(gamma, True) - expected_gradient(0.0, True)
    unweighted = expected_gradient(gamma, False) - expected_gradient(0.0, False)
    assert relative_error(weighted, exact) < 1e-12
    assert relative_error(unweighted, exact) > 0.1                  # what the unweighted reuse did
    # no weight was clipped in this check, so the equality above is the unclipped estimator's
    now = torch.log_softmax(theta, -1)
    w = torch.exp(now[torch.arange(2)[None, :, None], chosen] + now[torch.arange(2)[None, :, None], rejected]
                  - old_logps[0] - old_logps[1])
    from sail_min.objective import IMPORTANCE_CLIP
    assert w.max() < IMPORTANCE_CLIP


def test_fresh_pairs_get_weight_one_and_reuse_keeps_runs_reproducible():
    """reuse_steps = 1: no importance weights at all (bit-identical to the unweighted run); reuse: the
    weighted and unweighted runs differ, and no weight of the comparison's setting reaches the clip."""
    bandit = make_bandit(n_prompts=4, n_responses=5, beta=0.5, seed=0)
    pr = SAILConfig.preset("sail-pr")
    kwargs = dict(n_seeds=2, steps=40, eval_every=40, offline_pairs_per_prompt=8)
    assert train_sampled(bandit, pr, **kwargs) == train_sampled(bandit, pr, importance_weighting=False, **kwargs)
    reused = dict(kwargs, online_pairs_per_prompt=20, reuse_steps=10)
    a, b = train_sampled(bandit, pr, **reused), train_sampled(bandit, pr, importance_weighting=False, **reused)
    assert a["kl_opt"] != b["kl_opt"] and a["clipped_weights"] == 0


def test_bandit_public_term_weighs_the_configs_hook_scale():
    """The public-code term weighs public_hook_scale x its mean against the mean DPO term, per run."""
    bandit = make_bandit(n_prompts=3, n_responses=5, beta=0.5, seed=0)
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(2, 3, 5, dtype=F64, generator=g)
    chosen, rejected = torch.randint(5, (2, 3, 4), generator=g), torch.randint(5, (2, 3, 4), generator=g)
    route = torch.full((2, 3, 4), ROUTES.index("pr"))
    on = SAILConfig(route_dpo=0.0, route_pr=1.0, pr_response_coef=0.3, response_mode="public", public_hook_scale=8.0)
    off = on.replace(response_mode="off")
    loss_on, loss_off = (batch_loss(theta, bandit, c, chosen, rejected, route) for c in (on, off))
    per_run_mean = loss_on.response.view(2, 12).mean(1)
    assert torch.allclose(loss_on.loss - loss_off.loss, 8.0 * 0.3 * per_run_mean.sum(), rtol=1e-13, atol=0)


def test_training_loop_weights_a_reused_pairs_response_term_by_pi_over_pi_old():
    """train.pair_loss(old_logps=...): w = 1 on the step that drew the pairs (same loss as without), and on a
    later step the response term of each policy pair scaled by pi_theta(y1) pi_theta(y2) / (pi_old(y1) pi_old(y2)),
    the DPO term untouched (judge and dataset labels do not depend on theta)."""
    from sail_min.labels import PairLabels
    from sail_min.train import PairLogps, pair_loss

    g = torch.Generator().manual_seed(0)
    now = PairLogps(*(-3 - torch.rand(6, dtype=F64, generator=g) for _ in range(4)))
    labels, routes = PairLabels(torch.tensor([True, False, True, True, False, True])), torch.tensor([3, 3, 3, 0, 3, 3])
    config = SAILConfig(route_dpo=0.5, route_pr=0.5, pr_response_coef=0.5)
    plain = pair_loss(now, labels, routes, config)
    same = pair_loss(now, labels, routes, config, old_logps=now)
    assert torch.equal(plain.loss, same.loss)
    shift = torch.tensor([0.3, -0.2, 0.1, 0.5, 0.0, -0.4], dtype=F64)
    older = PairLogps(now.policy_first - shift / 2, now.policy_second - shift / 2, now.ref_first, now.ref_second)
    later = pair_loss(now, labels, routes, config, old_logps=older)
    weight = torch.where(routes == 3, shift.exp(), 1.0)              # a dataset pair's responses are not drawn: w = 1
    assert torch.allclose(later.response, weight * plain.response, rtol=1e-14, atol=0)
    assert torch.equal(later.parts["dpo"], plain.parts["dpo"])


def test_fixed_points_controls_at_pi_star_and_each_extra_term_away_from_it():
    """fixed_points: every control's exact field vanishes at pi* (a DPO term with oracle labels is
    stationary there on any pair distribution); each preset's extra term has a stable fixed point (|G| at
    round-off, every decay rate > 0) away from pi*, and the bias grows with the coefficient."""
    from sail_min.lab.fixed_points import PRESETS, field, fixed_point, sweep

    bandit = make_bandit(n_prompts=3, n_responses=4, beta=0.5, seed=2)
    for name, config in PRESETS.items():
        at_opt = field(bandit.optimal_logits, bandit, config).abs().max()
        if "control" in name or name == "online DPO":
            assert at_opt < 1e-15, name
        else:
            assert at_opt > 1e-4, name                       # pi* is not a fixed point of the variant
            point = fixed_point(bandit, config, steps=800)
            assert point["residual"] < 1e-12 and point["min_decay_rate"] > 0 and point["kl_opt"] > 1e-6, name
    kls = [p["kl_opt"] for p in sweep(bandit, lambda c: SAILConfig.preset("online-dpo", pr_response_coef=c),
                                      (0.1, 0.3, 1.0), steps=800)]
    assert kls == sorted(kls) and kls[0] > 0


def test_readme_quotes_the_bandit_printout():
    """README's bandit block is generated: each of its text blocks is a verbatim piece of
    results/bandit/bandit_table.txt (what `python -m sail_min bandit --full` printed) or the decomposition printed
    from results/bandit/fixed_points.json."""
    import json
    import re
    from pathlib import Path

    from sail_min.lab.bandit_comparison import BanditSetup
    from sail_min.lab.fixed_points import decomposition_parts, format_decomposition

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = re.search(r"<!-- bandit-findings: begin.*?<!-- bandit-findings: end -->", readme, flags=re.DOTALL)
    assert block, "README.md has no generated bandit block"
    printed = (root / "results" / "bandit" / "bandit_table.txt").read_text()
    fp = json.loads((root / "results" / "bandit" / "fixed_points.json").read_text())
    setup = BanditSetup()
    bandit = make_bandit(setup.n_prompts, setup.n_responses, setup.beta, setup.ref_scale, setup.problem_seed)
    bias = kl(torch.tensor(fp["presets"]["SAIL-PR"]["logits"], dtype=F64), bandit.optimal_logits).item()
    decomposition = format_decomposition(decomposition_parts(fp["decomposition"], bias), bias)
    quotes = re.findall(r"```text\n(.*?)\n```", block.group(0), flags=re.DOTALL)
    assert len(quotes) >= 3
    for quote in quotes:
        assert quote in printed or quote == decomposition, quote[:200]
