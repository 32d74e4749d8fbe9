"""``mozgach serve``: an OpenAI-compatible HTTP server where every adapter is a model.

One base and all of a run's adapters sit in one :class:`~mozgach_mlx.bank.AdapterBank`;
``model`` in a request names the base, an adapter, ``auto`` (routed by the bank's
router) or, with the extra body field ``adapters: {name: weight}``, a mix. Concurrent
requests are decoded together, one adapter per batch row, token by token (continuous
batching), so switching adapters costs nothing.

Modules: ``config`` (:class:`ServeConfig`, the limits), ``protocol`` (the OpenAI wire
format: request checks, responses, errors), ``models`` (what is served and how a name
resolves), ``engine`` (the slot KV cache and the batched forward), ``sampling``,
``scheduler`` (the batching thread), ``app`` (HTTP, on Starlette) and ``server``
(uvicorn, signals). Only ``config`` is imported here: the rest needs the ``serve``
extra (``pip install 'mozgach-mlx[serve]'``).
"""

from __future__ import annotations

from ..errors import ConfigError
from .config import ServeConfig

__all__ = ["ServeConfig", "serve"]


def serve(cfg: ServeConfig, *, out: str | None = None, model: str | None = None,
          adapters: list[str] | None = None) -> int:
    """Load a run (``out``) or ``model`` with ``adapters`` and serve them until SIGINT /
    SIGTERM; returns the exit code (0 after a graceful stop)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("mozgach serve needs the 'serve' extra: pip install 'mozgach-mlx[serve]'") from None
    from .models import load_served
    from .server import run_server

    if out is None and model is None and not adapters:
        raise ConfigError("mozgach serve needs --out RUN, or --model M (and --adapter DIR ...)")
    return run_server(load_served(out=out, model=model, adapters=adapters, router=cfg.router), cfg)
