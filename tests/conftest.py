import mozgach_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx
import pytest


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    yield
