"""pytest plugin for check_cuda.py (``-p gpu_default_device``): the GPU as MLX's default
device for the whole run, where there is one, and a line saying which device that is
(check_cuda.py reads it; printed even under ``-q``)."""

import mlx.core as mx


def pytest_configure(config):
    if mx.cuda.is_available() or mx.metal.is_available():
        mx.set_default_device(mx.gpu)


def pytest_sessionstart(session):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"mlx {mx.__version__}: default device {mx.default_device()}")
