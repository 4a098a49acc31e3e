import numpy as np
import pytest

from rlsys.lang.coords import COORD_TOKENS, decode, decode_xy, encode, encode_xy, token


def test_hand_worked_values():
    # encode = round(clamp(v / size, 0, 1) * 999)
    assert encode(0, 640) == 0
    assert encode(640, 640) == 999
    # 320 / 640 * 999 = 499.5 -> rint rounds half to even -> 500
    assert encode(320, 640) in (499, 500)
    # 100 / 640 * 999 = 156.09 -> 156
    assert encode(100, 640) == 156
    # 101 / 640 * 999 = 157.65 -> 158 (a floor encode would give 157)
    assert encode(101, 640) == 158
    # decode = bin / 999 * size: 156 / 999 * 640 = 99.94
    assert decode(156, 640) == pytest.approx(99.93994, abs=1e-4)
    assert decode(999, 480) == pytest.approx(480.0)
    assert decode(0, 480) == 0.0


def test_clamps_outside_image():
    assert encode(-5, 100) == 0
    assert encode(150, 100) == 999


def test_round_trip_error_bound_scalars_and_arrays():
    rng = np.random.default_rng(0)
    for size in (1, 7, 224, 640, 1333, 4096):
        v = rng.uniform(0, size, 5000)
        err = np.abs(decode(encode(v, size), size) - v)
        # rounding to the nearest of 999 steps of size/999 is off by at most half a step
        assert err.max() <= size / 1998 + 1e-9


def test_types():
    assert isinstance(encode(3.0, 10), int)
    assert isinstance(decode(3, 10), float)
    a = encode(np.array([0.0, 5.0, 10.0]), 10)
    assert a.dtype == np.int64 and a.tolist() == [0, 500, 999]  # 5/10*999 = 499.5 -> 500 (half to even)


def test_xy_uses_width_for_x_and_height_for_y():
    bins = encode_xy([10, 20, 30, 40], width=100, height=200)
    # x: 10/100*999 = 99.9 -> 100; y: 20/200*999 = 99.9 -> 100; 30/100*999=299.7 -> 300; 40/200*999 = 199.8 -> 200
    assert bins.tolist() == [100, 100, 300, 200]
    px = decode_xy(bins, 100, 200)
    assert np.allclose(px, [100 / 999 * 100, 100 / 999 * 200, 300 / 999 * 100, 200 / 999 * 200])


@pytest.mark.parametrize("bad", [-1, 1000, 3.5])
def test_decode_rejects_bins_outside_range(bad):
    with pytest.raises(ValueError):
        decode(bad, 100)


def test_rejects_nan_and_bad_size():
    with pytest.raises(ValueError, match="NaN"):
        encode(float("nan"), 100)
    with pytest.raises(ValueError, match="positive"):
        encode(1, 0)
    with pytest.raises(ValueError, match="positive"):
        decode(1, -3)


def test_tokens():
    assert token(0) == "<0>" and token(999) == "<999>"
    assert len(COORD_TOKENS) == 1000 and COORD_TOKENS[12] == "<12>"
    with pytest.raises(ValueError):
        token(1000)
