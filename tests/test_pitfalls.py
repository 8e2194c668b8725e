"""Detectors of online-DPO pitfalls that the loop logs: the two KL estimators (k1, k3) with standard errors, and
the share of tied judge scores at evaluation (notebook 06 reproduces the pitfalls themselves)."""
import pytest
import torch

from sail_min.config import SAILConfig
from sail_min.runtime import Runtime
from sail_min.lab.bandit import kl, make_bandit
from sail_min.lab.sentiment import load_base_model, load_sentiment_task
from sail_min.logprobs import ReferenceModel, sequence_logprobs
from sail_min.metrics import kl_estimates, standard_error
from sail_min.train import Task, evaluate, judge_samples, step_seed


def test_k3_is_never_negative_and_zero_only_where_the_logprobs_agree():
    d = torch.cat([10 * torch.randn(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                   torch.tensor([0.0, 1e-20, -1e-20, 1e-300, 1e-8, -1e-8, 40.0, -40.0, 700.0], dtype=torch.float64)])
    k1, k3 = kl_estimates(d, torch.zeros_like(d))
    assert torch.equal(k1, d) and (k1 < 0).any()                  # k1 is the log-ratio itself: negative samples
    assert (k3 >= 0).all() and torch.isfinite(k3).all()
    assert (k3[d.abs() >= 1e-12] > 0).all() and k3[d == 0].item() == 0    # (|d| < ~1e-16: d^2 / 2 rounds off)
    small = d[(d.abs() > 1e-8) & (d.abs() < 1e-2)]
    assert torch.allclose(kl_estimates(small, torch.zeros_like(small))[1], small ** 2 / 2, rtol=1e-2)   # k3 ~ d^2 / 2


def test_k1_and_k3_have_the_exact_kl_as_their_expectation():
    """On a bandit, where pi(y|x) is known for every y: sum_y pi(y) k(y) = KL(pi || pi_ref) for both estimators,
    exactly, and the mean of sampled k3 (all >= 0) and k1 (some < 0) is within 4 standard errors of it."""
    bandit = make_bandit(n_prompts=4, n_responses=6, seed=1)
    theta = bandit.ref_logits + torch.randn(bandit.ref_logits.shape, generator=torch.Generator().manual_seed(2),
                                            dtype=torch.float64)
    log_pi, log_ref = torch.log_softmax(theta, -1), bandit.log_ref
    k1, k3 = kl_estimates(log_pi, log_ref)                        # one value per (x, y)
    exact = kl(theta, bandit.ref_logits)
    for k in (k1, k3):
        assert torch.allclose((log_pi.exp() * k).sum(-1).mean(), exact, rtol=1e-12, atol=0)
    y = torch.multinomial(log_pi.exp(), 20_000, replacement=True, generator=torch.Generator().manual_seed(3))
    x = torch.arange(bandit.n_prompts)[:, None]
    for k in (k1, k3):
        per_prompt = k[x, y]                                      # [M, n] samples of each prompt
        estimate, se = per_prompt.mean(), (per_prompt.var(dim=1) / y.shape[1]).sum().sqrt() / bandit.n_prompts
        assert abs(estimate - exact) < 4 * se, (estimate, exact, se)
    assert (k1[x, y] < 0).any() and (k3[x, y] >= 0).all()


def test_near_the_reference_k3_has_a_smaller_variance_than_k1():
    bandit = make_bandit(n_prompts=4, n_responses=6, seed=1)
    theta = bandit.ref_logits + 0.1 * torch.randn(bandit.ref_logits.shape, generator=torch.Generator().manual_seed(2),
                                                  dtype=torch.float64)
    pi = torch.softmax(theta, -1)
    k1, k3 = kl_estimates(torch.log(pi), bandit.log_ref)
    variance = lambda k: (pi * k ** 2).sum(-1) - (pi * k).sum(-1) ** 2      # exact, per prompt   # noqa: E731
    assert (variance(k3) < 0.1 * variance(k1)).all()


def test_standard_error():
    assert standard_error(torch.tensor([1.0, 3.0])) == pytest.approx(2 ** 0.5 / 2 ** 0.5)   # sd sqrt(2), n 2
    assert standard_error(torch.tensor([5.0])) is None


@pytest.fixture(scope="module")
def one_evaluation():
    """evaluate() on the sentiment base policy (pi = pi_ref) and what it sampled, recomputed by hand."""
    files = load_sentiment_task()
    config = SAILConfig(eval_prompts=12, seed=3)
    policy, tokenizer = load_base_model()
    reference, runtime = ReferenceModel(policy), Runtime(config)
    task = Task([], files.train_prompts, files.eval_prompts, files.judge)
    sampler = runtime.sampler(tokenizer, rows=config.eval_prompts)
    reference_scores = torch.as_tensor(files.judge(task.eval_prompts[:12], ["."] * 12), dtype=torch.float32)
    record = evaluate(policy, reference, sampler, task, runtime, reference_scores)
    samples, scores = judge_samples(policy, sampler, task, config, step_seed(config.seed, -1, 0, "eval"))
    with torch.no_grad():
        logps = sequence_logprobs(policy, **samples.model_inputs())
    return record, logps, reference.logprobs(**samples.model_inputs()), scores, reference_scores


def test_evaluate_logs_k1_and_k3_with_their_standard_errors(one_evaluation):
    record, logps, ref_logps, _, _ = one_evaluation
    k1, k3 = kl_estimates(logps, ref_logps)
    assert record["eval/kl"] == pytest.approx(k1.mean().item(), abs=1e-6)
    assert record["eval/kl_k3"] == pytest.approx(k3.mean().item(), abs=1e-9) and record["eval/kl_k3"] >= 0
    assert record["eval/kl_se"] == pytest.approx(standard_error(k1), abs=1e-9)
    assert record["eval/kl_k3_se"] == pytest.approx(standard_error(k3), abs=1e-9)


def test_evaluate_logs_the_share_of_ties(one_evaluation):
    """The reference 'samples' here are '.', which VADER scores 0: every neutral sample of the policy ties."""
    record, _, _, scores, reference_scores = one_evaluation
    ties = (scores == reference_scores).float().mean().item()
    assert record["eval/ties"] == pytest.approx(ties) and 0 < ties < 1
    wins = ((scores > reference_scores).float().mean() + 0.5 * ties).item()
    assert record["eval/win_rate"] == pytest.approx(wins)
