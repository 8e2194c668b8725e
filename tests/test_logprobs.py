"""sequence_logprobs against a naive one-sequence-at-a-time reference; ReferenceModel."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sail_min.logprobs as logprobs_module
from sail_min.logprobs import ReferenceModel, sequence_logprobs
from transformers import GPT2Config, GPT2LMHeadModel

POLICY_DIR = Path(__file__).resolve().parents[1] / "data" / "tiny" / "policy"

# (prompt token ids, response token ids): different prompt and response lengths
ROWS = [([5, 17, 23], [40, 41, 2]),
        ([7], [300, 301, 302, 303, 304, 2]),
        ([9, 10, 11, 12, 13, 14], [60]),
        ([20, 21], [70, 71, 72, 73])]


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()


def naive_logprob(model, prompt, response):
    """One sequence alone, no padding: sum_t log_softmax(z_t)[y_t] over the response tokens."""
    ids = torch.tensor([prompt + response])
    logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)   # row t predicts ids[t+1]
    token_logprobs = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
    return token_logprobs[len(prompt) - 1:].sum()


def padded_batch(rows, side, pad_id=0):
    """Whole sequences padded on `side` ('left', 'right'), or 'mixed': prompt left, response right."""
    if side == "mixed":
        prompt_len = max(len(p) for p, _ in rows)
        response_len = max(len(r) for _, r in rows)
        ids, attention, response = [], [], []
        for p, r in rows:
            left, right = prompt_len - len(p), response_len - len(r)
            ids.append([pad_id] * left + p + r + [pad_id] * right)
            attention.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
            response.append([0] * (left + len(p)) + [1] * len(r) + [0] * right)
    else:
        length = max(len(p) + len(r) for p, r in rows)
        ids, attention, response = [], [], []
        for p, r in rows:
            pad = [0] * (length - len(p) - len(r))
            seq_ids, seq_att, seq_resp = p + r, [1] * (len(p) + len(r)), [0] * len(p) + [1] * len(r)
            if side == "left":
                ids.append(pad + seq_ids); attention.append(pad + seq_att); response.append(pad + seq_resp)
            else:
                ids.append(seq_ids + pad); attention.append(seq_att + pad); response.append(seq_resp + pad)
    return torch.tensor(ids), torch.tensor(attention), torch.tensor(response)


@pytest.mark.parametrize("side", ["left", "right", "mixed"])
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_matches_naive_one_at_a_time(policy, side, chunk_size):
    ids, attention, response = padded_batch(ROWS, side)
    with torch.no_grad():
        lean = sequence_logprobs(policy, ids, attention, response, chunk_size=chunk_size)
        naive = torch.stack([naive_logprob(policy, p, r) for p, r in ROWS])
    torch.testing.assert_close(lean, naive, atol=1e-5, rtol=0)


def test_gradient_matches_naive(policy):
    ids, attention, response = padded_batch(ROWS, "mixed")
    weights = torch.tensor([0.5, -1.0, 2.0, 1.5])      # an arbitrary linear loss of the four l(y|x)

    policy.zero_grad()
    (weights * sequence_logprobs(policy, ids, attention, response, chunk_size=2)).sum().backward()
    lean_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}

    policy.zero_grad()
    (weights * torch.stack([naive_logprob(policy, p, r) for p, r in ROWS])).sum().backward()
    for name, param in policy.named_parameters():
        torch.testing.assert_close(lean_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
    policy.zero_grad()


def vocab_sized_saved(policy, **options) -> list[tuple]:
    """Shapes of the tensors with the vocabulary as last dimension that autograd saves for backward."""
    ids, attention, response = padded_batch(ROWS, "mixed")
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sequence_logprobs(policy, ids, attention, response, chunk_size=2, **options)
    assert saved_shapes, "the hook saw nothing: the test would prove nothing"
    return [shape for shape in saved_shapes if shape[-1:] == (policy.config.vocab_size,)]


def test_no_full_vocab_logits_saved_for_backward(policy, monkeypatch):
    """Memory-lean: autograd keeps no tensor of logits (last dimension = vocab): the chunks'
    logits are recomputed in backward, when asked or when they would take more than KEEP_LOGITS_BYTES."""
    assert not vocab_sized_saved(policy, recompute=True)
    tokens = sum(len(response) for _, response in ROWS)
    assert vocab_sized_saved(policy)                 # by default: 14 x 512 x 4 bytes are kept, not recomputed
    monkeypatch.setattr(logprobs_module, "KEEP_LOGITS_BYTES", tokens * policy.config.vocab_size * 4 - 1)
    assert not vocab_sized_saved(policy)             # one byte more than the limit: recomputed


def test_kept_and_recomputed_logits_give_the_same_gradients(policy):
    ids, attention, response = padded_batch(ROWS, "mixed")
    gradients = []
    for recompute in (True, False):
        policy.zero_grad()
        sequence_logprobs(policy, ids, attention, response, chunk_size=3, recompute=recompute).sum().backward()
        gradients.append([p.grad.clone() for p in policy.parameters()])
    policy.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(*gradients))


def test_no_response_tokens_gives_zero(policy):
    ids, attention, response = padded_batch(ROWS, "right")
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(policy, ids, attention, torch.zeros_like(response)),
                           torch.zeros(len(ROWS)))


def test_bad_masks_are_named(policy):
    ids, attention, response = padded_batch(ROWS, "right")
    with pytest.raises(ValueError, match="shape"):
        sequence_logprobs(policy, ids, attention[:, :-1], response)
    with pytest.raises(ValueError, match="padding"):
        sequence_logprobs(policy, ids, attention, torch.ones_like(response))


def test_reference_model_is_a_frozen_snapshot():
    ids, attention, response = padded_batch(ROWS, "mixed")
    policy = AutoModelForCausalLM.from_pretrained(POLICY_DIR).train()   # its own copy: it gets trained
    reference = ReferenceModel(policy)
    assert reference.model is not policy and not reference.model.training
    assert not any(p.requires_grad for p in reference.model.parameters())

    before = reference.logprobs(ids, attention, response)
    assert not before.requires_grad
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    (-sequence_logprobs(policy, ids, attention, response).sum()).backward()   # one step on the policy
    optimizer.step()
    policy.zero_grad()
    with torch.no_grad():
        moved = sequence_logprobs(policy, ids, attention, response)
    assert (moved - before).abs().max() > 1e-2                        # the policy changed...
    torch.testing.assert_close(reference.logprobs(ids, attention, response), before)  # ...pi_ref did not
    assert policy.training


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_lora_reference_is_the_base_model_without_a_copy():
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    ids, attention, response = padded_batch(ROWS, "mixed")
    with torch.no_grad():
        base_logprobs = sequence_logprobs(base, ids, attention, response)

    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    policy = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(POLICY_DIR), config)
    torch.manual_seed(0)
    for name, param in policy.named_parameters():
        if "lora_B" in name:                       # move the adapter away from its zero init
            param.data.normal_(std=0.5)
    policy.train()
    reference = ReferenceModel(policy)
    assert reference.model is policy                 # shares the weights: no second copy

    ref_logprobs = reference.logprobs(ids, attention, response)
    torch.testing.assert_close(ref_logprobs, base_logprobs, atol=1e-5, rtol=0)
    assert policy.training                           # training mode restored
    policy.eval()
    with torch.no_grad():
        adapted = sequence_logprobs(policy, ids, attention, response)
    assert (adapted - base_logprobs).abs().max() > 1e-2   # the adapters are back on afterwards
    policy.train()
    with reference.as_module() as module, torch.no_grad():  # e.g. to sample from pi_ref
        torch.testing.assert_close(sequence_logprobs(module, ids, attention, response), base_logprobs,
                                   atol=1e-5, rtol=0)
        assert not module.training
    assert policy.training
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(policy.eval(), ids, attention, response), adapted)


# ---- position ids on an absolute-position model (GPT-2) ------------------------------------
GPT2_ROWS = [([5, 17, 23], [40, 41, 2]),                 # (prompt ids, response ids), all lengths differ
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


def padded_gpt2(rows, side, pad_id=0):
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


def gpt2_alone(model, prompt, response):
    """One row, no padding: positions 0..L-1 whatever sequence_logprobs passes."""
    ids = torch.tensor([prompt + response])
    return sequence_logprobs(model, ids, torch.ones_like(ids), torch.tensor([[0] * len(prompt) + [1] * len(response)]))[0]


def test_gpt2_alone_matches_a_plain_forward(gpt2):
    """sequence_logprobs works on GPT-2 (``get_decoder`` + ``get_output_embeddings``)."""
    for p, r in GPT2_ROWS:
        ids = torch.tensor([p + r])
        with torch.no_grad():
            token_logprobs = gpt2(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            torch.testing.assert_close(gpt2_alone(gpt2, p, r), token_logprobs[len(p) - 1:].sum(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right", "mixed"])
def test_gpt2_padded_rows_equal_rows_alone_values_and_gradients(gpt2, side):
    """Mutant: ``sequence_logprobs`` passes no position_ids (or counts padding in them)."""
    ids, attention, response = padded_gpt2(GPT2_ROWS, side)
    weights = torch.tensor([0.5, -1.0, 2.0, 1.5])                       # an arbitrary linear loss

    gpt2.zero_grad()
    batch = sequence_logprobs(gpt2, ids, attention, response, chunk_size=3)
    (weights * batch).sum().backward()
    batch_grads = {n: p.grad.clone() for n, p in gpt2.named_parameters()}

    gpt2.zero_grad()
    single = torch.stack([gpt2_alone(gpt2, p, r) for p, r in GPT2_ROWS])
    (weights * single).sum().backward()
    torch.testing.assert_close(batch.detach(), single.detach(), atol=1e-5, rtol=0)
    for name, param in gpt2.named_parameters():
        torch.testing.assert_close(batch_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
    gpt2.zero_grad()
