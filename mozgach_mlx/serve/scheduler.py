"""The scheduler: one thread that owns the model and decodes every live sequence as one
batch, token by token (continuous batching).

Each iteration it drops cancelled sequences, admits waiting ones up to ``max_seqs``
(routing those that asked for ``auto``, then one prefill per group of new prompts), and
runs one decode step for all live sequences, each row with its own adapter (or mix, or
none), its own position and its own sampling. A sequence that ends (EOS, a stop string,
``max_tokens``, the window) or is cancelled (client gone, shutdown) leaves the batch
at once and its slot of the KV cache is freed (:class:`~.engine.SlotCache`).

HTTP handlers talk to it through :meth:`Scheduler.submit`, which returns a
:class:`Sequence` whose events (``start``, ``text``, ``end``, ``error``) arrive on an
asyncio queue of the handler's loop. No error inside an iteration stops the thread: the
sequences involved get a 500 error event and the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from .config import ServeConfig
from .engine import SlotCache, decode_step, prefill
from .models import Served, Target
from .protocol import APIError
from .sampling import RowSampling, sample

__all__ = ["Job", "Scheduler", "Sequence"]

log = logging.getLogger("mozgach.serve")

PREFILL_TOKENS = 4096  # most (rows x padded length) tokens one prefill forward takes


@dataclass
class Job:
    """A checked request, tokenized: what the scheduler needs to run it."""

    ids: list[int]
    target: Target
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    route_text: str = ""


class Sequence:
    """One request in the scheduler: its state (touched by the scheduler thread only) and
    the event queue its handler reads (``(kind, payload)`` tuples)."""

    _ids = itertools.count()

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.id = next(self._ids)
        self.job = job
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self.cancelled = False
        self.spec: Any = job.target.spec
        self.generated: list[int] = []
        self.sent = 0  # characters of the text already emitted
        self.keys: mx.array | None = None

    def cancel(self) -> None:
        """Ask the scheduler to drop this sequence (thread-safe, idempotent)."""
        self.cancelled = True

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the handler's loop is gone (shutdown): nobody to tell
            pass


class Scheduler:
    """Continuous batching over a :class:`Served` bank (see the module docstring)."""

    def __init__(self, served: Served, cfg: ServeConfig, tok_lock: threading.Lock | None = None) -> None:
        self.served, self.cfg = served, cfg
        self.bank, self.model, self.tok = served.bank, served.bank.model, served.bank.tok
        self.tok_lock = tok_lock or threading.Lock()
        self.cache = SlotCache(len(self.model.layers))
        self.rows: list[Sequence] = []  # row i = slot i of the cache
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._selection = None
        self._selection_stale = True
        self._key = mx.random.key(int(np.random.SeedSequence().entropy % (1 << 63)))
        self.stats = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="mozgach-serve-scheduler", daemon=True)

    # ------------------------------------------------------------------ handler side

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every waiting and live sequence and end the thread."""
        self._stopping = True
        with self._lock:
            for s in list(self._waiting) + list(self.rows):
                s.cancel()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Sequence:
        """Queue a job; its :class:`Sequence` receives the events.

        Raises:
            APIError: 503 when shutting down, 429 when ``max_queue`` requests already wait.
        """
        seq = Sequence(job, loop)
        with self._lock:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._waiting) >= self.cfg.max_queue:
                raise APIError(429, f"{len(self._waiting)} requests are already waiting; retry later",
                               type="rate_limit_error", code="queue_full")
            self._waiting.append(seq)
            self.stats["submitted"] += 1
        self._wake.set()
        return seq

    def snapshot(self) -> dict:
        """Counters for ``/health`` (live sequences hold a KV-cache slot)."""
        with self._lock:
            waiting = len(self._waiting)
        return {"live_sequences": self.cache.live, "waiting": waiting, "kv_cache_bytes": self.cache.nbytes,
                **{k: int(v) for k, v in self.stats.items()}}

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            new: list[Sequence] = []
            try:
                self._drop_cancelled()
                if self._stopping and not self.rows:
                    with self._lock:
                        rest, self._waiting = list(self._waiting), collections.deque()
                    for s in rest:
                        self._end(s, "cancelled")
                    return
                self._wake.clear()  # before looking at the queue: a later submit wakes the wait below
                new = self._take_waiting()
                if new:
                    self._admit(new)
                if self.rows:
                    self._decode()
                elif not new:
                    self._wake.wait(1.0)
            except Exception as e:  # never let the thread die: fail what was involved, start clean
                log.exception("scheduler iteration failed")
                err = APIError(500, f"internal error while generating ({type(e).__name__}: {e})",
                               type="server_error", code="internal_error")
                for s in set(self.rows) | set(new):
                    s.emit("error", err)
                    self.stats["failed"] += 1
                self.rows, self.cache = [], SlotCache(len(self.model.layers))
                self._selection_stale = True

    def _take_waiting(self) -> list[Sequence]:
        free = self.cfg.max_seqs - len(self.rows)
        out = []
        with self._lock:
            while self._waiting and len(out) < free:
                s = self._waiting.popleft()
                if s.cancelled:
                    self._end(s, "cancelled")
                else:
                    out.append(s)
        return out

    def _drop_cancelled(self) -> None:
        for slot in range(len(self.rows) - 1, -1, -1):
            if self.rows[slot].cancelled:
                self._end(self.rows[slot], "cancelled")
                self._free(slot)

    def _free(self, slot: int) -> None:
        moved = self.cache.remove(slot)
        if moved is not None:
            self.rows[slot] = self.rows[moved]
        self.rows.pop()
        self._selection_stale = True

    def _end(self, s: Sequence, why: str) -> None:
        self.stats[why] += 1
        if why == "cancelled":  # whoever still listens (a shutdown, not a client that left) hears why
            s.emit("error", APIError(503, "the request was cancelled (client gone or server shutting down)",
                                     type="server_error", code="cancelled"))

    def _admit(self, new: list[Sequence]) -> None:
        autos = [s for s in new if s.job.target.auto]
        if autos:
            try:
                names = self.bank.route([s.job.route_text for s in autos], method=self.served.router)
            except Exception as e:  # only these requests fail; the batch goes on
                log.exception("routing failed")
                err = APIError(500, f"routing failed ({type(e).__name__}: {e})", type="server_error",
                               code="routing_failed")
                for s in autos:
                    s.emit("error", err)
                    self.stats["failed"] += 1
                new = [s for s in new if not s.job.target.auto]
            else:
                for s, top in zip(autos, names, strict=True):
                    s.spec = top[0]
        for s in new:
            s.emit("start", {"model": s.spec if s.job.target.auto else s.job.target.label,
                             "adapter": s.spec, "router": self.served.router if s.job.target.auto else None})
            if s.job.seed is not None and s.job.temperature > 0:
                s.keys = mx.random.split(mx.random.key(s.job.seed % (1 << 64)), s.job.max_tokens)
        new = sorted(new, key=lambda s: len(s.job.ids))
        group: list[Sequence] = []
        for s in new:  # groups of similar length, at most PREFILL_TOKENS padded tokens each
            if group and (len(group) + 1) * len(s.job.ids) > PREFILL_TOKENS:
                self._prefill(group)
                group = []
            group.append(s)
        if group:
            self._prefill(group)

    def _prefill(self, group: list[Sequence]) -> None:
        lengths = [len(s.job.ids) for s in group]
        ids = np.zeros((len(group), max(lengths)), np.int32)  # right padding: causal attention never sees it
        for r, s in enumerate(group):
            ids[r, : lengths[r]] = s.job.ids
        with self.bank.use(self.bank.selection([s.spec for s in group])):
            logits, kv = prefill(self.model, ids, lengths)
            mx.eval(logits, *[a for pair in kv for a in pair])
        first = len(self.rows)
        self.cache.add(kv, lengths)
        self.rows.extend(group)
        self._selection_stale = True
        self.stats["prefill_tokens"] += sum(lengths)
        self._consume(logits, range(first, first + len(group)))

    def _decode(self) -> None:
        if self._selection_stale:
            self._selection = self.bank.selection([s.spec for s in self.rows])
            self._selection_stale = False
        with self.bank.use(self._selection):
            logits = decode_step(self.model, self.cache, [s.generated[-1] for s in self.rows])
            mx.eval(logits, *self.cache.state())
        self.stats["steps"] += 1
        self.stats["step_rows"] += len(self.rows)
        self._consume(logits, range(len(self.rows)))

    def _row_sampling(self, s: Sequence) -> RowSampling:
        j = s.job
        if j.temperature <= 0:
            return RowSampling()
        if s.keys is not None:
            key = s.keys[len(s.generated)]
        else:
            self._key, key = mx.random.split(self._key)
        return RowSampling(j.temperature, j.top_p, key)

    def _consume(self, logits: mx.array, slots: range) -> None:
        """Sample the next token of the rows in ``slots`` and move each on (emit text,
        finish); finished rows leave the batch."""
        rows = [self.rows[i] for i in slots]
        tokens = sample(logits, [self._row_sampling(s) for s in rows])
        done = []
        for slot, s, t in zip(slots, rows, tokens, strict=True):
            try:
                if self._advance(s, t):
                    done.append(slot)
            except Exception as e:  # this row alone fails (e.g. its text cannot be decoded)
                log.exception("sequence %d failed", s.id)
                s.emit("error", APIError(500, f"internal error ({type(e).__name__}: {e})", type="server_error",
                                         code="internal_error"))
                self.stats["failed"] += 1
                done.append(slot)
        for slot in sorted(done, reverse=True):
            self._free(slot)

    def _advance(self, s: Sequence, token: int) -> bool:
        """Take one generated token; True when the sequence has ended."""
        j = s.job
        finish = None
        if token == self.tok.eos_token_id:
            finish = "stop"
        else:
            s.generated.append(token)
            self.stats["tokens"] += 1
            if len(s.generated) >= j.max_tokens:
                finish = "length"
        with self.tok_lock:
            text = self.tok.decode(s.generated)
        if j.stop:
            hit = [i for i in (text.find(st, max(0, s.sent - len(st) + 1)) for st in j.stop) if i >= 0]
            if hit:
                text, finish = text[: min(hit)], "stop"
        if finish is None:
            text = _stable_prefix(text, j.stop)
        if len(text) > s.sent:
            s.emit("text", text[s.sent:])
            s.sent = len(text)
        if finish is None:
            return False
        s.emit("end", {"finish_reason": finish, "prompt_tokens": len(j.ids), "completion_tokens": len(s.generated)})
        self._end(s, "finished")
        return True


def _stable_prefix(text: str, stops: list[str]) -> str:
    """What of a growing text can be sent now: without a trailing incomplete character
    (U+FFFD from a partial UTF-8 sequence) and without a tail that may become a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for st in stops:
        for k in range(min(len(st) - 1, len(text)), 0, -1):
            if text.endswith(st[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]
