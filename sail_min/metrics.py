"""What a run writes: one line of metrics per step (TRL's names where it has them) to
``output_dir/metrics.jsonl``, evaluation lines carrying ``eval/*`` keys, and ``config.json``.

``step_record`` turns one step's loss and pairs into that line; ``open_metrics`` starts (or, on resume,
trims) the file and ``append_metrics`` adds a line; ``SCHEMA`` lists every key a line can carry, with its
type and when it is there. Nothing here changes what is trained.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .config import ROUTES, SAILConfig
from .sampling import compile_stats

NUMBER, OPTIONAL = (int, float), (int, float, type(None))
SCHEMA = {   # name: (accepted types, when the line has it: "step" every line, "eval" evaluations, "skip" skipped steps)
    "step": (int, "step"), "loss": (NUMBER, "step"), "loss/dpo": (NUMBER, "step"),
    "loss/response": (OPTIONAL, "step"), "loss/label": (OPTIONAL, "step"),
    "rewards/chosen": (NUMBER, "step"), "rewards/rejected": (NUMBER, "step"), "rewards/margins": (NUMBER, "step"),
    "rewards/accuracies": (NUMBER, "step"),
    **{f"pairs/{name}": (int, "step") for name in ROUTES},
    "online/response_length": (OPTIONAL, "step"), "online/contains_eos": (OPTIONAL, "step"),
    "time/generate": (NUMBER, "step"), "time/label": (NUMBER, "step"), "time/train": (NUMBER, "step"),
    "tokens_per_second": (NUMBER, "step"), "compile/graphs": (int, "step"), "compile/seconds": (NUMBER, "step"),
    "skipped_steps": (int, "step"), "truncated_prompts": (int, "step"), "truncated_responses": (int, "step"),
    "judge_queries": (int, "step"), "grad_norm": (OPTIONAL, "step"), "clipped": (bool, "step"),
    "judge_truncated_inputs": (int, "step"),
    "grad_norm/dpo": (OPTIONAL, "eval"), "grad_norm/response": (NUMBER, "eval"), "grad_norm/label": (NUMBER, "eval"),
    "eval/judge_reward": (NUMBER, "eval"), "eval/judge_reward_std": (NUMBER, "eval"),
    "eval/reference_judge_reward": (NUMBER, "eval"), "eval/win_rate": (NUMBER, "eval"), "eval/kl": (NUMBER, "eval"),
    "eval/reference_judge_reward_std": (NUMBER, "eval"), "eval/ties": (NUMBER, "eval"),
    "eval/kl_std": (NUMBER, "eval"), "eval/kl_se": (OPTIONAL, "eval"),          # k1: log pi / pi_ref of a sample
    "eval/kl_k3": (NUMBER, "eval"), "eval/kl_k3_se": (OPTIONAL, "eval"),        # k3 = (r - 1) - log r >= 0
    "eval/response_length": (NUMBER, "eval"), "eval/contains_eos": (NUMBER, "eval"), "time/evaluate": (NUMBER, "eval"),
    "skip/what": (str, "skip"), "skip/nonfinite_logp_rows": (dict, "skip"), "skip/nonfinite_grads": (list, "skip"),
    "skip/inputs": (str, "skip"),
}
"""Every key of a metrics.jsonl line: its types (a bool is not a number here) and when a line has it: "step" on
every line, "eval" on evaluation lines (one process: the per-term gradient norms too), "skip" on skipped steps."""


class MetricsError(ValueError):
    """A metrics.jsonl that cannot be continued: names the file, the line and what to do."""


def step_record(step: int, loss, pairs, config: SAILConfig, seconds: dict, counters: dict, compiled_before: dict,
                grad_norm: float | None, skipped: dict, term_norms: dict, judge_truncated_inputs: int) -> dict:
    """The metrics of one step: the loss and its terms, the implicit rewards, the routes, online lengths,
    the gradient norm before clipping (None: a skipped step) and, at evaluations, each term's."""
    response_coef, label_coef = config.coefficients(pairs.routes)
    online = pairs.routes >= ROUTES.index("pp")
    lengths = torch.cat([pairs.first.lengths, pairs.second.lengths]).float()
    with_eos = torch.cat([pairs.first.contains_eos, pairs.second.contains_eos]).float()
    tokens = int(lengths.sum())
    z = loss.z.cpu()
    return {
        "step": step, "loss": loss.loss.item(), "loss/dpo": loss.dpo.mean().item(),
        "loss/response": masked_mean(loss.response, response_coef > 0),
        "loss/label": masked_mean(loss.label, label_coef > 0),
        "rewards/chosen": loss.chosen_rewards.mean().item(), "rewards/rejected": loss.rejected_rewards.mean().item(),
        "rewards/margins": z.mean().item(), "rewards/accuracies": (z > 0).float().mean().item(),
        **{f"pairs/{name}": int((pairs.routes == i).sum()) for i, name in enumerate(ROUTES)},
        "online/response_length": lengths[online.repeat(2)].mean().item() if online.any() else None,
        "online/contains_eos": with_eos[online.repeat(2)].mean().item() if online.any() else None,
        **{f"time/{name}": value for name, value in seconds.items()},
        "tokens_per_second": tokens / max(seconds["train"], 1e-9),
        **compilations_since(compiled_before),
        **counters,
        **skipped,
        **term_norms,
        "grad_norm": grad_norm,
        **({"grad_norm/dpo": grad_norm} if term_norms and "grad_norm/dpo" not in term_norms else {}),  # DPO = total
        "clipped": bool(config.max_grad_norm and grad_norm is not None and grad_norm > config.max_grad_norm),
        "judge_truncated_inputs": judge_truncated_inputs,
    }


def kl_estimates(logps: torch.Tensor, ref_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Two per-sample estimates of KL(pi || pi_ref) from responses y ~ pi, with d = l_pi(y) - l_ref(y):

        k1 = d = log pi(y) / pi_ref(y)                      E_pi[k1] = KL, but one sample can be < 0
        k3 = (r - 1) - log r = expm1(-d) + d,  r = pi_ref(y) / pi(y) = exp(-d)

    k3 is >= 0 for every sample (log r <= r - 1) and unbiased too, because E_pi[r] = sum_y pi_ref(y) = 1 adds
    E_pi[r - 1] = 0 to E_pi[k1]; its variance is lower than k1's near pi_ref and heavy-tailed where pi_ref is
    far more likely than pi. Both estimate KL(pi || pi_ref) only for samples of pi itself (temperature 1).
    Returns (k1, k3) in float64, one value per sample."""
    d = (logps.detach() - ref_logps.detach()).double()
    return d, (torch.expm1(-d) + d).clamp(min=0.0)       # clamp: round-off of expm1 when |d| < 1e-16 only


def standard_error(values: torch.Tensor) -> float | None:
    """sd / sqrt(n) of a sample mean (None for fewer than 2 values)."""
    return (values.double().std() / len(values) ** 0.5).item() if len(values) > 1 else None


def compilations_since(compiled_before: dict) -> dict:
    """torch.compile graphs and seconds since ``compiled_before`` (a ``compile_stats()``)."""
    return {f"compile/{k}": v - compiled_before[k] for k, v in compile_stats().items()}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean over the pairs where a term applies (None when it applies to none)."""
    mask = mask.to(values.device)
    return values[mask].mean().item() if mask.any() else None


def open_metrics(out: Path, config: SAILConfig, start: int, resume: bool) -> list[dict]:
    """Write config.json; keep the metrics of steps before ``start`` (a resumed run redoes the rest).

    Resuming at step ``start`` > 0, what is wrong with the file is said (a warning) with what was done:
    a half-written LAST line (a run killed while writing it) is dropped and its step redone; a missing file, or
    one that ends before ``start``, is started (or continued) from ``start``, the earlier steps' lines lost.
    A damaged line elsewhere (not JSON, not a record with a step) is a ``MetricsError`` naming the file and the
    line: the run does not guess which steps it holds."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    metrics_path = out / "metrics.jsonl"
    kept = read_metrics(metrics_path, start) if resume else []
    if resume and start > 0:
        steps = {record["step"] for record in kept}
        if not metrics_path.exists():
            warnings.warn(f"{metrics_path} is missing: the metrics of steps 0-{start - 1} are lost; the file starts "
                          f"again at step {start}", RuntimeWarning)
        elif steps != set(range(start)):
            lost = sorted(set(range(start)) - steps)
            warnings.warn(f"{metrics_path} lacks the lines of {len(lost)} step(s) before {start} (first {lost[0]}): "
                          f"they are lost; the file continues at step {start}", RuntimeWarning)
    metrics_path.write_text("".join(json.dumps(record) + "\n" for record in kept))
    return kept


def read_metrics(path: Path, before: int) -> list[dict]:
    """The lines of ``path`` (if it exists) of steps before ``before``; see ``open_metrics`` for damaged files."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise MetricsError(f"{path}: cannot be read ({error}); move it away to resume without the earlier "
                           f"steps' metrics, or restore it") from None
    kept = []
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
            if number == len(lines) - 1:
                warnings.warn(f"{path} line {number + 1} is not complete JSON (a run killed while writing?): "
                              "dropped, the step is redone", RuntimeWarning)
                continue
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            raise MetricsError(f"{path} line {number + 1}: not a metrics line (a JSON object with a step): the "
                               f"file is damaged; repair or remove that line, or move the file away to resume "
                               f"without the earlier steps' metrics")
        if record["step"] < before:
            kept.append(record)
    return kept


def append_metrics(out: Path, record: dict, accelerator) -> None:
    """One line of metrics.jsonl, and the numbers to accelerate's trackers (--report-to) if any."""
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                        step=record["step"])
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
