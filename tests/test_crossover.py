"""The gap-trend fit behind experiments/results/c4_crossover.md, and the script on the committed results."""

import math
import pathlib
import subprocess
import sys

import pytest

from moe_jax.crossover import NO_TREND, GapPoint, describe, fit_gap_trend

REPO = pathlib.Path(__file__).resolve().parents[1]


def line_points(intercept, slope, spread, lengths=(1e6, 4e6, 16e6)):
    """Three seeds per length, symmetric about the line: the fit must return the line itself."""
    return [GapPoint(t, tuple(intercept + slope * math.log(t) + d for d in (-spread, 0.0, spread)))
            for t in lengths]


def test_a_clear_trend_is_extrapolated_to_where_the_line_is_zero():
    # MoE behind by 0.015 at 1M tokens and 0.004 at 16M, narrowing: zero at exp(0.07 / 0.004) = 3.98e7.
    trend = fit_gap_trend(line_points(0.07, -0.004, 0.001))
    assert trend.slope == pytest.approx(-0.004) and trend.intercept == pytest.approx(0.07)
    assert trend.slope_beyond_noise
    assert trend.crossover == pytest.approx(math.exp(0.07 / 0.004))
    assert trend.crossover_low < trend.crossover < trend.crossover_high < math.inf
    assert "reaches zero (the MoE model would draw level) at 3.98e+07 tokens" in describe(trend)
    # MoE ahead and its lead shrinking: the same zero, the other meaning.
    closing = fit_gap_trend(line_points(-0.07, 0.004, 0.001))
    assert closing.crossover == pytest.approx(math.exp(0.07 / 0.004))
    assert "reaches zero (the MoE model's lead would close) at 3.98e+07 tokens" in describe(closing)
    # A gap that is already past zero inside the measured range is not a future crossover: its sign change lies
    # behind it, at exp(0.05 / 0.004) = 2.68e5 tokens, where the MoE model's lead opened.
    opened = fit_gap_trend(line_points(0.05, -0.004, 0.001))
    assert math.isinf(opened.crossover) and opened.sign_change == pytest.approx(math.exp(0.05 / 0.004))
    assert 0 < opened.sign_change_low < opened.sign_change < opened.sign_change_high
    assert "going back, the line was zero at 2.68e+05 tokens" in describe(opened)
    assert "the MoE model is ahead" in describe(opened)


def test_a_slope_inside_its_noise_gives_no_upper_bound_and_says_so():
    trend = fit_gap_trend(line_points(0.05, -0.002, 0.02))
    assert not trend.slope_beyond_noise and math.isinf(trend.crossover_high)
    assert "within two standard errors of no change" in describe(trend) and "no crossover at all" in describe(trend)
    # A gap growing with training never reaches zero.
    growing = fit_gap_trend(line_points(0.0, 0.003, 0.0005))
    assert math.isinf(growing.crossover) and "no crossover ahead" in describe(growing)
    assert growing.sign_change == pytest.approx(1.0) and "the MoE model is behind" in describe(growing)
    assert math.isnan(trend.sign_change)  # a gap moving towards zero has no sign change behind it


def test_one_length_or_one_seed_is_no_trend():
    assert fit_gap_trend(line_points(0.07, -0.004, 0.001, lengths=(1e6,))) is NO_TREND
    assert fit_gap_trend([GapPoint(1e6, (0.01,)), GapPoint(4e6, (0.02,))]) is NO_TREND
    assert "no trend yet" in describe(NO_TREND)


def test_the_script_fits_the_committed_c4_results(tmp_path):
    proc = subprocess.run([sys.executable, "experiments/ablations/c4_crossover.py", f"--output_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "c4_crossover.md").read_text()
    # c4_byte.csv's paired seeds at 300 steps: +0.0069, +0.0197, +0.0114 (mean +0.0127).
    # 1.23M bytes is 0.24 epochs of the sample's 5.10M-byte training split.
    assert "| 300 | 1.23M | 0.24 | +0.0069, +0.0197, +0.0114 | +0.0127 ± 0.0037 |" in md
    assert "5.10M UTF-8 bytes of the sample's training split" in md
    assert "nats per doubling of the training bytes" in md
    assert (tmp_path / "c4_crossover.png").read_bytes()[:4] == b"\x89PNG"
