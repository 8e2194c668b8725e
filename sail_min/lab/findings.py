r"""Findings the data carry: a paired difference, its standard error, and the verdict word computed from them.

Every finite-sample comparison in this project (the README's tables, notebooks 02 and 05, the result summaries)
goes through ``paired``: method A and method B run with the same seeds, so the comparison is the mean of the
per-seed differences d_s = a_s - b_s,

    d = (1/n) sum_s d_s,     SE(d) = sd(d_s) / sqrt(n),

and its verdict word is decided at ONE threshold, ``THRESHOLD_SE`` standard errors:

    "above"                   d >=  3 SE     (the standard error is at most a third of the effect)
    "below"                   d <= -3 SE
    "level within noise (±x)" otherwise, x = 3 SE: the data cannot tell the two apart at this n

A verdict is about the runs that were made: "level" does not say the methods are equal, only that n runs do not
resolve a difference of that size; "above" says nothing about other tasks, budgets or settings. Markdown and
prose never type these words about a measured number (``tests/test_verdict_words.py`` lints them); they print
``str(paired(...))`` or quote it.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

THRESHOLD_SE = 3.0
"""|d| >= THRESHOLD_SE * SE(d) is an effect ("above" / "below"); anything smaller is "level within noise"."""


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_sd of no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(difference: float, standard_error: float, threshold: float = THRESHOLD_SE) -> str:
    """"above", "below" or "level within noise (±x)" for a difference and its standard error."""
    if not (math.isfinite(difference) and math.isfinite(standard_error) and standard_error >= 0):
        raise ValueError(f"verdict needs a finite difference and SE >= 0, got {difference!r} ± {standard_error!r}")
    margin = threshold * standard_error
    if standard_error > 0 and difference >= margin:
        return "above"
    if standard_error > 0 and difference <= -margin:
        return "below"
    return f"level within noise (±{margin:.2g})"


@dataclass(frozen=True)
class Paired:
    """A paired comparison of A with B: the mean per-run difference A - B, its SE and n."""

    difference: float
    """mean over runs of a_s - b_s"""
    standard_error: float
    """sd(a_s - b_s) / sqrt(n)"""
    n: int
    """number of paired runs"""

    @property
    def verdict(self) -> str:
        """"above" / "below" / "level within noise (±x)" at ``THRESHOLD_SE`` (A relative to B)."""
        return verdict(self.difference, self.standard_error)

    @property
    def is_effect(self) -> bool:
        """The SE is at most 1 / THRESHOLD_SE of the difference: a difference this project calls an effect."""
        return not self.verdict.startswith("level")

    def __str__(self) -> str:
        return f"{self.difference:+.3f} ± {self.standard_error:.3f} (SE, n={self.n}): {self.verdict}"

    def to_dict(self) -> dict:
        return {"difference": self.difference, "se": self.standard_error, "n": self.n, "verdict": self.verdict}


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """A - B run by run (``a[s]`` and ``b[s]`` share seed s). Needs n >= 2 equal-length lists."""
    if len(a) != len(b):
        raise ValueError(f"paired runs need equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"a paired comparison needs at least 2 runs, got {len(a)}")
    differences = [float(x) - float(y) for x, y in zip(a, b)]
    mean, sd = mean_sd(differences)
    return Paired(mean, sd / math.sqrt(len(differences)), len(differences))


def difference_of_means(a: Sequence[float], b: Sequence[float]) -> Paired:
    """A - B for UNPAIRED runs (independent seeds): mean(a) - mean(b), SE = sqrt(var_a / n_a + var_b / n_b);
    ``n`` is the smaller of the two counts."""
    if min(len(a), len(b)) < 2:
        raise ValueError(f"a difference of means needs at least 2 runs each, got {len(a)} and {len(b)}")
    (mean_a, sd_a), (mean_b, sd_b) = mean_sd(a), mean_sd(b)
    return Paired(mean_a - mean_b, math.sqrt(sd_a ** 2 / len(a) + sd_b ** 2 / len(b)), min(len(a), len(b)))


def format_runs_table(rows: dict[str, Sequence[float]], title: str = "value", digits: int = 3) -> str:
    """A run-to-run table: one row per name with its mean, sample SD and n."""
    width = max([len("method"), *map(len, rows)])
    lines = [f"{'method':<{width}}  {title + ' mean':>14}  {'SD':>8}  {'n':>4}"]
    for name, values in rows.items():
        mean, sd = mean_sd(values)
        lines.append(f"{name:<{width}}  {mean:>14.{digits}f}  {sd:>8.{digits}f}  {len(values):>4}")
    return "\n".join(lines)


def format_paired_table(comparisons: dict[str, Paired], title: str = "A - B") -> str:
    """One row per comparison: difference, SE, n and the computed verdict."""
    width = max([len("comparison"), *map(len, comparisons)])
    lines = [f"{'comparison':<{width}}  {title:>10}  {'SE':>7}  {'n':>4}  verdict (|d| >= {THRESHOLD_SE:g} SE)"]
    for name, p in comparisons.items():
        lines.append(f"{name:<{width}}  {p.difference:>+10.3f}  {p.standard_error:>7.3f}  {p.n:>4}  {p.verdict}")
    return "\n".join(lines)
