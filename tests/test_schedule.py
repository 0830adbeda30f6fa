import math

import pytest

from carlos.errors import CarlosError
from carlos.optimization import clip_warmup, warmup_constant, warmup_cosine, warmup_stable_decay

PEAK, MIN = 1e-3, 1e-5


def cos(step, total=100, warmup=10):
    return warmup_cosine(step, total_steps=total, peak_lr=PEAK, warmup_steps=warmup, min_lr=MIN)


def test_linear_warmup_values():
    assert cos(0) == pytest.approx(PEAK / 10)
    assert cos(4) == pytest.approx(PEAK * 5 / 10)
    assert cos(9) == pytest.approx(PEAK)


def test_cosine_values():
    assert cos(10) == pytest.approx(PEAK)
    assert cos(55) == pytest.approx(MIN + (PEAK - MIN) * 0.5)  # halfway through the decay
    assert cos(100) == pytest.approx(MIN)
    assert cos(200) == pytest.approx(MIN)  # past the end it stays at min_lr
    quarter = MIN + (PEAK - MIN) * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert cos(10 + 90 // 4, total=100) == pytest.approx(MIN + (PEAK - MIN) * 0.5 * (1 + math.cos(math.pi * 22 / 90)))
    assert quarter > cos(40)


def test_warmup_longer_than_the_run_is_clipped_to_a_fifth():
    assert clip_warmup(2000, 40) == 8
    assert clip_warmup(5, 40) == 5
    # a 40-step run with the default 1000-step warmup still reaches the peak and decays
    lrs = [cos(s, total=40, warmup=1000) for s in range(41)]
    assert lrs[7] == pytest.approx(PEAK) and lrs[40] == pytest.approx(MIN)
    assert max(lrs) == pytest.approx(PEAK)


def test_warmup_stable_decay_values():
    def wsd(step):
        return warmup_stable_decay(step, total_steps=100, peak_lr=PEAK, warmup_steps=10, min_lr=MIN, decay_fraction=0.2)

    assert wsd(0) == pytest.approx(PEAK / 10)
    assert wsd(10) == wsd(79) == pytest.approx(PEAK)
    assert wsd(80) == pytest.approx(PEAK)
    assert wsd(90) == pytest.approx(PEAK + (MIN - PEAK) * 0.5)
    assert wsd(100) == pytest.approx(MIN)
    with pytest.raises(CarlosError):
        warmup_stable_decay(0, total_steps=10, peak_lr=PEAK, warmup_steps=1, min_lr=MIN, decay_fraction=0)


def test_constant_values():
    assert warmup_constant(0, total_steps=100, peak_lr=PEAK, warmup_steps=4) == pytest.approx(PEAK / 4)
    assert warmup_constant(50, total_steps=100, peak_lr=PEAK, warmup_steps=4) == PEAK


def test_weight_decay_follows_the_epochs_in_log_scale_and_holds_beyond_the_rule():
    from carlos.optimization import weight_decay_for

    points, values = [4.0, 16.0, 64.0], [0.1, 0.5, 0.5]
    assert weight_decay_for(1.0, points, values) == 0.1  # before the first point: held
    assert weight_decay_for(4.0, points, values) == 0.1
    assert weight_decay_for(8.0, points, values) == pytest.approx(0.3)  # halfway in log(epochs)
    assert weight_decay_for(16.0, points, values) == pytest.approx(0.5)
    assert weight_decay_for(1000.0, points, values) == 0.5
