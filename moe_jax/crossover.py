"""Where does the Switch-minus-dense gap change sign? A fit of the gap against log training tokens.

Each point is one training length: the per-seed gaps (MoE run minus the dense run of the same seed; paired,
since both see the same data order). The trend is a weighted least-squares line, gap = a + b ln(tokens),
weights 1 / (standard error of the point's mean gap)^2, and the crossover is where that line reaches zero.
Its range moves the slope by two standard errors about the weighted centre of the points (the slope's
uncertainty only: with two or three lengths the intercept's adds little the slope's does not already cover).
A slope whose two-standard-error range reaches the wrong sign means no crossover can be extrapolated.
A gap moving away from zero has its sign change behind it instead: `sign_change` is where the line was zero,
below the lengths that show the gap (e.g. where the MoE model's lead opened).
"""

from __future__ import annotations

import dataclasses
import math

from moe_jax.sweep_results import seed_stats


@dataclasses.dataclass(frozen=True)
class GapPoint:
    """The paired per-seed gaps (nats) of one training length."""

    tokens: float
    gaps: tuple

    @property
    def mean(self) -> float:
        return seed_stats(self.gaps)[0]

    @property
    def stderr(self) -> float:
        _, std, n = seed_stats(self.gaps)
        return std / math.sqrt(n)


@dataclasses.dataclass(frozen=True)
class GapTrend:
    """gap = intercept + slope * ln(tokens); crossover tokens with the range of slope ± 2 standard errors
    (inf: the line does not reach zero in the future along that slope; nan: no fit)."""

    slope: float
    slope_stderr: float
    intercept: float
    crossover: float
    crossover_low: float
    crossover_high: float
    # where a gap moving away from zero was zero (nan otherwise; a bound of 0: that slope never was zero)
    sign_change: float = float("nan")
    sign_change_low: float = float("nan")
    sign_change_high: float = float("nan")

    @property
    def slope_per_doubling(self) -> float:
        return self.slope * math.log(2)

    @property
    def slope_beyond_noise(self) -> bool:
        """The slope is more than two standard errors from zero."""
        return math.isfinite(self.slope_stderr) and abs(self.slope) > 2 * self.slope_stderr


NO_TREND = GapTrend(*(float("nan"),) * 6)


def fit_gap_trend(points: list[GapPoint]) -> GapTrend:
    """The weighted line through `points` (at least two lengths, each with two or more seeds) and its
    crossover; NO_TREND when that is not met."""
    usable = [p for p in points if math.isfinite(p.stderr) and p.stderr > 0]
    if len({p.tokens for p in usable}) < 2:
        return NO_TREND
    x = [math.log(p.tokens) for p in usable]
    w = [1 / p.stderr ** 2 for p in usable]
    y = [p.mean for p in usable]
    x_centre = sum(wi * xi for wi, xi in zip(w, x)) / sum(w)
    y_centre = sum(wi * yi for wi, yi in zip(w, y)) / sum(w)
    spread = sum(wi * (xi - x_centre) ** 2 for wi, xi in zip(w, x))
    slope = sum(wi * (xi - x_centre) * (yi - y_centre) for wi, xi, yi in zip(w, x, y)) / spread
    slope_stderr = math.sqrt(1 / spread)

    def zero_at(b: float) -> float:
        if b == 0 or (y_centre > 0) == (b > 0):  # moving away from zero as tokens grow
            return math.inf
        return math.exp(x_centre - y_centre / b)

    def was_zero_at(b: float) -> float:
        if b == 0 or (b > 0) != (slope > 0):  # this slope moves towards zero (or not at all) as tokens grow
            return 0.0
        return math.exp(x_centre - y_centre / b)

    slopes = (slope - 2 * slope_stderr, slope + 2 * slope_stderr)
    bounds = sorted(zero_at(b) for b in slopes)
    past = (was_zero_at(slope), *sorted(was_zero_at(b) for b in slopes)) if math.isinf(zero_at(slope)) and slope \
        else (float("nan"),) * 3
    return GapTrend(slope, slope_stderr, y_centre - slope * x_centre, zero_at(slope), *bounds, *past)


def describe(trend: GapTrend, unit: str = "tokens") -> str:
    """One sentence on the trend and its crossover, for a results file."""
    if not math.isfinite(trend.slope):
        return "Fewer than two training lengths with two or more seeds: no trend yet."
    sentence = (f"The gap moves by {trend.slope_per_doubling:+.4f} ± {trend.slope_stderr * math.log(2):.4f} "
                f"nats per doubling of the training {unit} (± one standard error)")
    if not trend.slope_beyond_noise:
        sentence += ", within two standard errors of no change"
    if math.isinf(trend.crossover) and math.isfinite(trend.sign_change):
        side = "ahead" if trend.slope < 0 else "behind"
        low = "no sign change at all" if trend.sign_change_low == 0 else f"{trend.sign_change_low:.3g}"
        return (sentence + f"; the gap grows away from zero, so there is no crossover ahead; going back, the line "
                f"was zero at {trend.sign_change:.3g} {unit} (slope ± 2 standard errors: {low} to "
                f"{trend.sign_change_high:.3g}): from there on the MoE model is {side}.")
    if math.isinf(trend.crossover):
        return sentence + "; along it the gap does not reach zero: no crossover can be extrapolated."
    high = "no crossover at all" if math.isinf(trend.crossover_high) else f"{trend.crossover_high:.3g}"
    meaning = "the MoE model's lead would close" if trend.slope > 0 else "the MoE model would draw level"
    return (sentence + f"; the line reaches zero ({meaning}) at {trend.crossover:.3g} {unit} (slope ± 2 standard "
            f"errors: {trend.crossover_low:.3g} to {high}).")
