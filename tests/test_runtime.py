"""Runtime.step is plain PyTorch's backward / clip / step with its additions in view: a StepResult says what
happened, no state carries over between calls, and DeepSpeed is refused in one line naming FSDP2."""
import types

import pytest
import torch
from accelerate.utils import DistributedType

from sail_min.config import SAILConfig
from sail_min.runtime import Runtime, StepResult, attention_kernels, autocast


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(8, 4)


def test_a_finite_step_is_plain_pytorch_with_the_norm_before_clipping():
    config = SAILConfig(max_grad_norm=0.5)
    model, optimizer, x = tiny_problem()
    twin, twin_optimizer, _ = tiny_problem()
    loss = (model(x) ** 2).mean() * 100
    result = Runtime(config).step(loss, model, optimizer)
    (twin(x) ** 2).mean().mul(100).backward()                      # the same by hand
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    twin_optimizer.step()
    assert isinstance(result, StepResult) and result.taken and result.loss_finite
    assert result.grad_norm == pytest.approx(norm.item()) and result.grad_norm > 0.5          # before clipping
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_a_non_finite_loss_skips_the_step_and_the_next_step_is_unaffected():
    runtime = Runtime(SAILConfig())
    model, optimizer, x = tiny_problem()
    before = [p.detach().clone() for p in model.parameters()]
    skipped = runtime.step(model(x).mean() * float("nan"), model, optimizer)
    assert not skipped.taken and not skipped.loss_finite and skipped.grad_norm != skipped.grad_norm   # nan
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    optimizer.zero_grad()
    taken = runtime.step(model(x).mean(), model, optimizer)        # nothing carried over from the skipped call
    assert taken.taken and taken.loss_finite and taken.grad_norm == taken.grad_norm


def test_non_finite_gradients_skip_the_step():
    runtime = Runtime(SAILConfig())
    model, optimizer, x = tiny_problem()
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(x).mean()
    model.weight.register_hook(lambda grad: grad * float("inf"))
    result = runtime.step(loss, model, optimizer)
    assert result.loss_finite and not result.taken
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_finite_gradients_whose_norm_overflows_float32_skip_the_step():
    """The check reads the gradient norm: every gradient finite, but ||g|| > float32's max (~3.4e38), is skipped
    too (clipping would scale the gradients by max_grad_norm / inf = 0, a step of nothing but momentum)."""
    runtime = Runtime(SAILConfig())
    model, optimizer, x = tiny_problem()
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(x).mean() * 1e30                                     # gradients ~1e29-1e30: squared, inf
    result = runtime.step(loss, model, optimizer)
    assert torch.isfinite(model.weight.grad).all() and result.loss_finite
    assert not result.taken and result.grad_norm == float("inf")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_deepspeed_is_refused_in_one_line_naming_fsdp2():
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=2,
                                        is_main_process=True, distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(NotImplementedError, match="DeepSpeed is not supported: FSDP2") as error:
        Runtime(SAILConfig(), accelerator)
    assert "\n" not in str(error.value)


def test_precision_and_kernel_contexts_take_the_one_field_they_read():
    with autocast("no", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels(False):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
