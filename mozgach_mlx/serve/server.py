"""Running the server: load what is served, bind, serve until SIGINT/SIGTERM, exit 0.

On a signal uvicorn stops accepting connections and gives in-flight requests
``shutdown_seconds`` to finish; then it cancels them (each cancelled sequence leaves the
batch) and the app's lifespan stops the scheduler. Unlike uvicorn's own handler, ours
does not re-raise the signal afterwards, so a graceful stop exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import uvicorn

from .app import build_app
from .config import ServeConfig
from .models import Served

__all__ = ["exposure_warning", "run_server"]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only (an in-process server in a test)
            return

        def on_signal(sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for in-flight requests
            self.should_exit = True

        before = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)


def exposure_warning(cfg: ServeConfig) -> str | None:
    """The warning for a server reachable beyond this machine without an API key."""
    if not cfg.exposed_without_key():
        return None
    return (f"warning: serving on {cfg.host} without an API key: anyone who can reach this machine can use "
            "the models; pass --api-key (or set MOZGACH_API_KEY)")


def run_server(served: Served, cfg: ServeConfig) -> int:
    """Serve ``served`` on ``cfg.host:cfg.port`` until a signal; returns the exit code."""
    warning = exposure_warning(cfg)
    if warning:
        print(warning, file=sys.stderr)
    app = build_app(served, cfg)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info", lifespan="on",
                            timeout_graceful_shutdown=cfg.shutdown_seconds)
    names = served.ids()
    print(f"serving {len(served.bank)} adapter(s) over {served.base_name} at http://{cfg.host}:{cfg.port}/v1 "
          f"(models: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}; auto routes by "
          f"{served.router})", file=sys.stderr, flush=True)
    try:
        _Server(config).run()
    finally:
        served.close()
    return 0
