"""bench.fashion_sweep's per-image rows: packed correctness round-trips, paired standard errors."""

import math

import numpy as np
import pytest

from bench import fashion_sweep as fs


def row_of(bits: np.ndarray) -> dict:
    return {"correct_hex": np.packbits(bits.astype(np.uint8)).tobytes().hex(), "correct_n": int(bits.size)}


def test_paired_difference_and_standard_error_from_the_packed_bits():
    rng = np.random.default_rng(0)
    n = 1003  # not a multiple of 8: the padding bits are dropped
    a = (rng.random(n) < 0.92).astype(np.float64)
    b = np.where(rng.random(n) < 0.05, 1 - a, a)  # mostly the same images right: a paired pair
    np.testing.assert_array_equal(fs.bits_of(row_of(a)), a)
    d, se = fs.paired(row_of(a), row_of(b))
    diff = a - b
    assert d == pytest.approx(100 * diff.mean(), abs=1e-12)
    assert se == pytest.approx(100 * math.sqrt(((diff - diff.mean()) ** 2).mean() / n), rel=1e-12)
    # pairing matters: the unpaired error of the difference is far larger here
    unpaired = 100 * math.sqrt(a.var() / n + b.var() / n)
    assert se < 0.7 * unpaired
    assert fs.paired(row_of(a), row_of(a)) == (0.0, 0.0)
