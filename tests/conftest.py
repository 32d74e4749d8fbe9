# ruff: noqa: I001  (import order matters: mozgach_mlx must load the fast BLAS before mlx.core)
import mozgach_mlx  # noqa: F401
import mlx.core as mx
import pytest


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    yield
