"""The KL coefficient controllers."""
import pytest

from ppo_fast.ppo import AdaptiveKLController, FixedKLController


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(5.0, 64)
    assert fixed.value == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    adaptive.update(12.0, 64)  # error clipped to 0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    adaptive.update(5.4, 100)  # error -0.1
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000) * (1 - 0.1 * 100 / 10000))
