"""Tests aimed at plausible wrong versions of the code (mutants) that other tests let through.

Each test names the mutation it is there to catch:

  * the LOO baseline is computed but not subtracted (or added) in ``response_term``;
  * ``sequence_logprobs`` passes no position ids, or counts them over padding: invisible on
    rotary (relative) position models such as the tiny Qwen2/Llama, fatal on GPT-2's absolute
    position embeddings;
  * the training loop's finite-step check is inverted or ignored.
"""
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from sail_min.config import SAILConfig
from sail_min.logprobs import sequence_logprobs
from sail_min.objective import loo_baseline, response_term
from sail_min.lab.sentiment import load_base_model, load_sentiment_task
from sail_min.train import Task, train

F64 = torch.float64


# --------------------------------------------------------------------------------------
# the leave-one-out baseline is subtracted, by value
# --------------------------------------------------------------------------------------
def test_loo_baseline_by_hand_with_interleaved_groups():
    values = torch.tensor([1.0, 10.0, 2.0, 20.0, 6.0, 5.0], dtype=F64)
    groups = torch.tensor([7, 3, 7, 3, 7, 9])          # ids need not be 0..n-1 or contiguous
    # group 7: {1, 2, 6}; group 3: {10, 20}; group 9: {5} alone -> 0
    expected = [(2 + 6) / 2, 20 / 1, (1 + 6) / 2, 10 / 1, (1 + 2) / 2, 0.0]
    assert loo_baseline(values, groups).tolist() == expected
    # no groups: one group of all six
    total = sum(values.tolist())
    assert torch.allclose(loo_baseline(values), torch.tensor([(total - v) / 5 for v in values.tolist()], dtype=F64))


def test_response_term_subtracts_the_loo_baseline():
    """Mutant: ``response_term`` computes b but returns f * (l_w + l_l) (or f + b)."""
    z = torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=F64)
    l_w = torch.tensor([-5.0, -7.0, -3.0, -9.0], dtype=F64, requires_grad=True)
    l_l = torch.tensor([-6.0, -4.0, -8.0, -2.0], dtype=F64, requires_grad=True)
    f = [-F.logsigmoid(torch.tensor(v, dtype=F64)).item() for v in z.tolist()]
    b = [(sum(f) - f_i) / 3 for f_i in f]                                 # leave-one-out mean, by hand
    expected = torch.tensor([(f_i - b_i) * (w + l) for f_i, b_i, w, l in
                             zip(f, b, l_w.tolist(), l_l.tolist())], dtype=F64)

    with_loo = response_term(z, l_w, l_l, baseline="loo")
    torch.testing.assert_close(with_loo, expected, rtol=1e-12, atol=1e-12)
    without = response_term(z, l_w, l_l, baseline="none")
    torch.testing.assert_close(without, torch.tensor(f, dtype=F64) * (l_w + l_l).detach())
    assert (with_loo - without).abs().min() > 0.1                        # the baseline matters here
    with_loo.sum().backward()                                             # gradient weight: f - b
    torch.testing.assert_close(l_w.grad, torch.tensor(f, dtype=F64) - torch.tensor(b, dtype=F64))
    torch.testing.assert_close(response_term(z, l_w, l_l, baseline=torch.tensor(b, dtype=F64)), with_loo)


# --------------------------------------------------------------------------------------
# position ids on an absolute-position model
# --------------------------------------------------------------------------------------
ROWS = [([5, 17, 23], [40, 41, 2]),                 # (prompt ids, response ids), all lengths differ
        ([7], [30, 31, 32, 33, 34, 2]),
        ([9, 10, 11, 12, 13, 14], [60]),
        ([20, 21], [50, 51, 52, 53])]


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
                        bos_token_id=None, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()                               # eval: no dropout
    with torch.no_grad():                                                # make positions matter a lot
        model.transformer.wpe.weight.normal_(std=1.0)
    return model


def padded(rows, side, pad_id=0):
    """Rows padded on the left, the right, or 'mixed' (prompts left-padded, responses right-padded)."""
    ids, attention, response = [], [], []
    prompt_len, response_len = max(len(p) for p, _ in rows), max(len(r) for _, r in rows)
    length = max(len(p) + len(r) for p, r in rows)
    for p, r in rows:
        if side == "mixed":
            left, right = prompt_len - len(p), response_len - len(r)
        elif side == "left":
            left, right = length - len(p) - len(r), 0
        else:
            left, right = 0, length - len(p) - len(r)
        ids.append([pad_id] * left + p + r + [pad_id] * right)
        attention.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
        response.append([0] * (left + len(p)) + [1] * len(r) + [0] * right)
    return torch.tensor(ids), torch.tensor(attention), torch.tensor(response)


def alone(model, prompt, response):
    """One row, no padding: positions 0..L-1 whatever sequence_logprobs passes."""
    ids = torch.tensor([prompt + response])
    return sequence_logprobs(model, ids, torch.ones_like(ids), torch.tensor([[0] * len(prompt) + [1] * len(response)]))[0]


def test_gpt2_alone_matches_a_plain_forward(gpt2):
    """sequence_logprobs works on GPT-2 (``get_decoder`` + ``get_output_embeddings``)."""
    for p, r in ROWS:
        ids = torch.tensor([p + r])
        with torch.no_grad():
            token_logprobs = gpt2(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            torch.testing.assert_close(alone(gpt2, p, r), token_logprobs[len(p) - 1:].sum(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right", "mixed"])
def test_gpt2_padded_rows_equal_rows_alone_values_and_gradients(gpt2, side):
    """Mutant: ``sequence_logprobs`` passes no position_ids (or counts padding in them)."""
    ids, attention, response = padded(ROWS, side)
    weights = torch.tensor([0.5, -1.0, 2.0, 1.5])                       # an arbitrary linear loss

    gpt2.zero_grad()
    batch = sequence_logprobs(gpt2, ids, attention, response, chunk_size=3)
    (weights * batch).sum().backward()
    batch_grads = {n: p.grad.clone() for n, p in gpt2.named_parameters()}

    gpt2.zero_grad()
    single = torch.stack([alone(gpt2, p, r) for p, r in ROWS])
    (weights * single).sum().backward()
    torch.testing.assert_close(batch.detach(), single.detach(), atol=1e-5, rtol=0)
    for name, param in gpt2.named_parameters():
        torch.testing.assert_close(batch_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
    gpt2.zero_grad()


# --------------------------------------------------------------------------------------
# a finite step moves the weights, a non-finite one is skipped (through the public loop)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sentiment():
    return load_sentiment_task()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def poison(policy, fault):
    """Make the policy's training forward passes non-finite: its loss ("loss") or only its
    gradient ("gradient"). Forward passes without gradient (sampling, evaluation) and the
    reference model (a copy, another module) are left alone."""
    decoder = policy.get_decoder()

    def hook(module, inputs, output):
        if module is not decoder or not torch.is_grad_enabled():
            return None
        hidden = output.last_hidden_state
        if fault == "loss":
            output.last_hidden_state = hidden * float("nan")
        else:
            hidden.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return output

    decoder.register_forward_hook(hook)


@pytest.mark.parametrize("fault", [None, "loss", "gradient"])
def test_a_finite_step_moves_the_weights_and_a_non_finite_one_does_not(sentiment, tmp_path, one_thread, fault):
    """Mutant: the loop's skip check inverted (never steps on a finite step) or ignored.

    A NaN loss never reaches backward, so only the "gradient" fault (finite loss, NaN gradient)
    catches a loop that steps regardless: its NaN weights then fail the run or the assertion."""
    policy, tokenizer = load_base_model()
    task = Task(sentiment.preferences()[:8], sentiment.train_prompts[:8], sentiment.eval_prompts,
                sentiment.judge, sentiment.bt_temperature)
    config = SAILConfig.preset("offline-dpo", steps=1, pairs_per_step=2, eval_prompts=2, eval_every=1,
                               max_new_tokens=4, lr=1e-2, output_dir=str(tmp_path))
    if fault:
        poison(policy, fault)
    before = [p.detach().clone() for p in policy.parameters()]
    if fault:
        with pytest.warns(RuntimeWarning, match="non-finite"):
            history = train(config, policy, tokenizer, task, progress=False)
    else:
        history = train(config, policy, tokenizer, task, progress=False)
    after = [p.detach() for p in policy.parameters()]

    if fault is None:
        assert history[-1]["skipped_steps"] == 0
        assert all(torch.isfinite(p).all() for p in after)
        assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > len(before) // 2
    else:
        assert history[-1]["skipped_steps"] == 1
        assert all(torch.equal(a, b) for a, b in zip(before, after))      # bitwise: no step at all
        if fault == "gradient":                                            # the loss itself was fine
            assert torch.isfinite(torch.tensor(history[-1]["loss"]))
