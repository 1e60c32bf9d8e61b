import math

import numpy as np
import pytest

from calibration.gate import conformal_threshold


def test_threshold_is_the_right_order_statistic():
    scores = np.arange(1, 20, dtype=float)  # n = 19
    # ceil(20 * 0.95) = 19 -> the largest
    assert conformal_threshold(scores, 0.05) == 19.0
    # ceil(20 * 0.9) = 18
    assert conformal_threshold(scores, 0.1) == 18.0


def test_too_few_negatives_gives_inf():
    assert conformal_threshold(np.arange(10.0), 0.05) == math.inf


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_false_fire_rate_is_bounded(alpha):
    rng = np.random.default_rng(0)
    fires = []
    for _ in range(3000):
        cal = rng.normal(size=39)
        tau = conformal_threshold(cal, alpha)
        fires.append(rng.normal() > tau)
    rate = float(np.mean(fires))
    assert rate <= alpha + 0.015  # guarantee ≤ α, plus Monte-Carlo slack
    assert rate >= alpha - 0.05  # and not vacuously conservative
