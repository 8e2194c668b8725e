"""The verdict helper: the word follows the numbers at one threshold, and paired SEs are the textbook ones."""
import math

import pytest

from sail_min.lab.findings import (THRESHOLD_SE, difference_of_means, format_paired_table, format_runs_table, paired,
                                   verdict)


def test_paired_difference_and_standard_error_by_hand():
    a, b = [1.0, 2.0, 4.0], [0.5, 1.0, 1.5]           # differences 0.5, 1.0, 2.5: mean 4/3, sd sqrt(13/12)
    p = paired(a, b)
    assert p.n == 3 and math.isclose(p.difference, 4 / 3)
    assert math.isclose(p.standard_error, math.sqrt(((0.5 - 4 / 3) ** 2 + (1 - 4 / 3) ** 2 + (2.5 - 4 / 3) ** 2) / 2) / math.sqrt(3))


@pytest.mark.parametrize("d, se, word", [(0.31, 0.1, "above"), (0.75, 0.25, "above"), (-0.75, 0.25, "below"),
                                         (0.29, 0.1, "level within noise (±0.3)"), (0.0, 0.0, "level within noise (±0)"),
                                         (-0.1, 0.05, "level within noise (±0.15)")])
def test_the_verdict_is_decided_at_one_threshold(d, se, word):
    assert THRESHOLD_SE == 3.0
    assert verdict(d, se) == word


def test_pairing_matters_and_bad_input_is_named():
    common = [0.0, 10.0, -10.0, 5.0]
    a, b = [c + 1.0 for c in common], common           # exactly +1 per run: paired SE 0, unpaired SE large
    assert paired(a, b).standard_error == 0.0 and paired(a, b).verdict.startswith("level")   # SE 0: no claim
    assert difference_of_means(a, b).verdict.startswith("level")
    with pytest.raises(ValueError, match="equal lengths"):
        paired([1, 2], [1])
    with pytest.raises(ValueError, match="at least 2 runs"):
        paired([1], [2])
    with pytest.raises(ValueError, match="finite"):
        verdict(float("nan"), 0.1)


def test_tables_carry_mean_sd_n_and_the_verdict():
    runs = format_runs_table({"online DPO": [1.0, 2.0, 3.0], "offline DPO": [0.5, 0.5]}, title="reward")
    assert "2.000" in runs and "1.000" in runs and "  3" in runs and "  2" in runs
    table = format_paired_table({"SAIL-PR - control": paired([1.0, 1.2, 1.1, 1.3], [0.0, 0.1, 0.0, 0.2])})
    assert "+1.075" in table and "above" in table and f"|d| >= {THRESHOLD_SE:g} SE" in table
