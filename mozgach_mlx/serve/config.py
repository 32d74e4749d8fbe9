""":class:`ServeConfig`: the one source of ``mozgach serve``'s defaults and limits.

Importing it needs nothing beyond the core package (the CLI builds its options from it
whether or not the ``serve`` extra is installed)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..typecheck import check_fields

__all__ = ["LOCALHOST", "ServeConfig"]

LOCALHOST = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """Where the server listens and what it allows one request and all of them together.

    Args:
        host, port: the address to bind (beyond localhost without ``api_key``: a warning).
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        max_tokens: most tokens one request may generate (also the chat default).
        max_seqs: most sequences decoded at once (one batch; each holds a KV cache).
        max_queue: most requests waiting for a free sequence slot; beyond it a 429.
        max_body_bytes: largest request body read (a 413 beyond it, before any parsing).
        router: how ``model: "auto"`` picks an adapter: loss, tokens, signature, probe
            (default: the best router measured by ``mozgach eval`` on the run, else loss).
        shutdown_seconds: on SIGINT/SIGTERM, how long in-flight requests may finish
            before they are cancelled.
    """

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (default 127.0.0.1: this machine only)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)"})
    max_tokens: int = field(default=512, metadata={"help": "most tokens one request may generate"})
    max_seqs: int = field(default=32, metadata={"help": "most sequences decoded at once (one batch)"})
    max_queue: int = field(default=256, metadata={"help": "most requests waiting for a slot (then 429)"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body in bytes (then 413)"})
    router: str | None = field(default=None, metadata={
        "help": "router of model 'auto': loss, tokens, signature or probe (default: the run's best "
                "measured by `mozgach eval`, else loss)"})
    shutdown_seconds: float = field(default=10.0, metadata={
        "help": "on Ctrl-C / SIGTERM, seconds in-flight requests may finish before they are cancelled"})
    api_key: str | None = field(default=None, repr=False, metadata={"help": "require this Bearer key"})

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("max_tokens", "max_seqs", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} is not a TCP port (0-65535)")
        if self.shutdown_seconds < 0:
            raise ConfigError(f"--shutdown-seconds must be >= 0, got {self.shutdown_seconds}")
        if self.router not in (None, "loss", "tokens", "signature", "probe"):
            raise ConfigError(f"--router {self.router!r}: use loss, tokens, signature or probe")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; give a key or leave it out")

    def exposed_without_key(self) -> bool:
        """True when the server would listen beyond this machine with no API key."""
        return self.api_key is None and self.host not in LOCALHOST
