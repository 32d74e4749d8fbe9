"""Fast CPU elementwise math against numpy float64 references."""

import mlx.core as mx
import numpy as np
import pytest

from mozgach_mlx import ops


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(params=["cpu", "default"])
def device(request):
    old = mx.default_device()
    if request.param == "cpu":
        mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(old)


def test_exp2_and_exp_neg_match_numpy(device):
    y = np.linspace(-125.0, 0.0, 100_001).astype(np.float32)
    got = np.array(ops.exp2(mx.array(y)))
    want = np.exp2(y.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)
    x = np.linspace(-80.0, 0.0, 10_001).astype(np.float32)
    # x * log2(e) rounds in fp32: relative error ~|x| * 6e-8 on top of the polynomial's
    np.testing.assert_allclose(np.array(ops.exp_neg(mx.array(x))), np.exp(x.astype(np.float64)), rtol=1e-5)
    np.testing.assert_allclose(np.array(ops.exp_pow(mx.array(x))), np.exp(x.astype(np.float64)), rtol=1e-5)
    # far below the normal range (a masked score): exactly 0, never NaN/inf or a tiny normal
    # that products turn into subnormals
    far = np.array(ops.exp2(mx.array([-127.0, -150.0, -1000.0, -np.inf])))
    assert (far == 0).all(), far


def test_sigmoid_and_silu_match_numpy_without_overflow(device):
    x = np.concatenate([np.linspace(-100, 100, 20_001), [-1e4, -88.8, 88.8, 1e4]]).astype(np.float32)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(np.array(ops.sigmoid(mx.array(x))), _np_sigmoid(xd), rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(np.array(ops.silu(mx.array(x))), xd * _np_sigmoid(xd), rtol=1e-5, atol=1e-30)


def test_silu_gradient_matches_analytic_derivative(device):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 96)) * 6).astype(np.float32)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    g = mx.grad(lambda a: (ops.silu(a) * mx.array(w)).sum())(mx.array(x))
    s = _np_sigmoid(x.astype(np.float64))
    want = w * s * (1 + x * (1 - s))
    np.testing.assert_allclose(np.array(g), want, rtol=2e-5, atol=1e-6)
