"""fp16 loss scaling in ``Runtime.step`` (on the CPU, whose GradScaler is the same algorithm as CUDA's): the
gradients are unscaled before the finite check, the norm and the clip, and an overflow or a non-finite loss
lowers the scale (the scaler is updated on every step, taken or not)."""
import pytest
import torch

from sail_min.config import SAILConfig
from sail_min.runtime import Runtime

SCALE = 2.0 ** 16                                 # GradScaler's initial scale


def problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(8, 4)


def fp16_runtime(max_grad_norm=0.5):
    runtime = Runtime(SAILConfig(mixed_precision="fp16", max_grad_norm=max_grad_norm))
    assert runtime.scaler is not None and runtime.scaler.get_scale() == SCALE
    return runtime


def test_fp16_unscales_before_the_norm_and_the_clip_and_steps_like_fp32():
    """Mutant: no ``unscale_`` before the norm: the logged norm is SCALE times too large, the clip cuts the scaled
    gradient, and the step is not fp32's."""
    model, optimizer, x = problem()
    twin, twin_optimizer, _ = problem()
    result = fp16_runtime().step((model(x) ** 2).mean() * 100, model, optimizer)
    (twin(x) ** 2).mean().mul(100).backward()                          # fp32 by hand
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    twin_optimizer.step()
    assert result.taken and result.grad_norm == pytest.approx(norm.item(), rel=1e-6) and norm > 0.5
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fault", ["overflow", "nan loss"])
def test_fp16_an_overflow_or_a_non_finite_loss_lowers_the_scale_and_skips(fault):
    """Mutant: the scaler updated only on taken steps: the scale never comes down and fp16 overflows forever."""
    runtime = fp16_runtime()
    model, optimizer, x = problem()
    before = [p.detach().clone() for p in model.parameters()]
    if fault == "overflow":
        loss = model(x).mean()
        hook = model.weight.register_hook(lambda grad: grad * float("inf"))
    else:
        loss = model(x).mean() * float("nan")
    result = runtime.step(loss, model, optimizer)
    assert not result.taken and all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert runtime.scaler.get_scale() == SCALE * runtime.scaler.get_backoff_factor()
    if fault == "overflow":
        hook.remove()
    optimizer.zero_grad()
    assert runtime.step(model(x).mean(), model, optimizer).taken                 # and the next step goes on
