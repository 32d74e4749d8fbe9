"""Start the ranks of a local ``mx.distributed`` job (ring over 127.0.0.1) with a launcher
that sleeps while they run.

    mozgach launch -n 2 -- mozgach train --distributed adapters --out run1
    python -m mozgach_mlx.launch -n 2 -- python my_script.py

Why not ``mlx.launch``: in MLX 0.32 it forwards the ranks' output with a loop that never
blocks (each rank's thread ``select``s on the child's stdin pipe, which is always
writable, so ``select`` returns at once; the main thread polls every 0.1 s), and it uses
one CPU core for the whole run (measured: ~100% of a core next to two idle ranks,
``benchmarks/RESULTS.md``). On a 2-core machine that is half the compute.

What the ring backend needs, read from MLX's launcher and ``libmlx`` (the variables it
reads are ``MLX_RANK``, ``MLX_HOSTFILE``, ``MLX_RING_VERBOSE``): each rank gets
``MLX_RANK=r`` and ``MLX_HOSTFILE``, the path of a JSON file ``[["127.0.0.1:p0"],
["127.0.0.1:p1"], ...]`` (one list of ``ip:port`` per rank; rank r listens on its own).

This launcher:

- picks N free ports on 127.0.0.1 (or ``--port P``: P .. P+N-1), writes the hostfile;
- starts N copies of the command (same working directory and environment plus the two
  variables; stdin is /dev/null), in the launcher's process group, so Ctrl-C and
  ``kill -- -PGID`` reach every rank; on Linux each rank also dies with the launcher
  (``PR_SET_PDEATHSIG``), however the launcher dies;
- sets ``MOZGACH_BLAS_THREADS`` to cores // N for the ranks unless it is already set (N
  ranks with the default threads would oversubscribe the cores);
- forwards the ranks' stdout and stderr as they come, one blocking reader thread per
  pipe (whole lines, unprefixed), and waits for the ranks in blocking ``wait`` calls:
  nothing polls;
- when a rank exits non-zero (or is killed by a signal), prints one line ``rank N failed:
  <its last stderr line>`` to stderr, terminates the other ranks (SIGTERM, then SIGKILL
  after ``--grace`` seconds) and exits with that rank's code (128 + the signal's number for
  a signal); when every rank exits 0 it exits 0.

For several machines use ``mlx.launch --hostfile ...`` (ssh, ring or JACCL); this
launcher only starts ranks on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from . import settings
from .errors import ConfigError

HOST = "127.0.0.1"
GRACE_S = 5.0
USAGE = "mozgach launch -n N [--port P] [--grace S] [--verbose] -- COMMAND [ARGS...]"


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct ports that were free on ``host`` a moment ago (held together while
    chosen, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ring_hostfile(ports: Sequence[int], host: str = HOST) -> str:
    """The ring backend's hostfile (what ``MLX_HOSTFILE`` points to): one ``[ip:port]`` per rank."""
    return json.dumps([[f"{host}:{p}"] for p in ports])


def rank_env(rank: int, hostfile: str | os.PathLike, n: int, base: dict | None = None,
             verbose: bool = False) -> dict[str, str]:
    """The environment of rank ``rank`` of ``n``: ``base`` (default: this process's) plus
    ``MLX_RANK``, ``MLX_HOSTFILE``, and ``MOZGACH_BLAS_THREADS`` = cores // n unless set."""
    env = settings.environment() if base is None else dict(base)
    if n > 1:  # one rank: no group (world size 1), like mlx.launch
        env["MLX_RANK"] = str(rank)
        env["MLX_HOSTFILE"] = str(hostfile)
    env.setdefault("MOZGACH_BLAS_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    if verbose:
        env["MLX_RING_VERBOSE"] = "1"
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Rank:
    """One rank: its process and the readers that forward its output."""

    def __init__(self, rank: int, command: list[str], env: dict[str, str], out_lock: threading.Lock) -> None:
        self.rank = rank
        self.last_error = ""
        self._lock = out_lock
        try:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        except OSError as e:
            raise ConfigError(f"launch: cannot start {command[0]!r} ({e.strerror or e}); check the command "
                              f"after `--` ({USAGE})") from None
        self.readers: list[threading.Thread] = []

    def start_readers(self) -> None:
        for pipe, sink, is_err in ((self.proc.stdout, sys.stdout, False), (self.proc.stderr, sys.stderr, True)):
            t = threading.Thread(target=self._forward, args=(pipe, sink, is_err), daemon=True)
            t.start()
            self.readers.append(t)

    def _forward(self, pipe, sink, is_err: bool) -> None:
        """Copy ``pipe`` to ``sink`` in whole lines (a blocking read per chunk)."""
        pending = b""
        fd = pipe.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 16)  # blocks until the rank writes or exits
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
            if cut:
                self._write(sink, pending[:cut], is_err)
                pending = pending[cut:]
        if pending:
            self._write(sink, pending, is_err)
        pipe.close()

    def _write(self, sink, data: bytes, is_err: bool) -> None:
        if is_err:
            lines = [x.strip() for x in data.decode(errors="replace").replace("\r", "\n").split("\n")]
            self.last_error = next((x for x in reversed(lines) if x), self.last_error)
        with self._lock:
            sink.buffer.write(data)
            sink.flush()


def exit_code(returncode: int) -> int:
    """A shell's exit code for a child's return code (-SIG -> 128 + SIG)."""
    return 128 - returncode if returncode < 0 else returncode


def _why(rank: _Rank) -> str:
    code = rank.proc.returncode
    line = rank.last_error
    if line.lower().startswith("error: "):
        line = line[len("error: "):]
    if code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        return f"killed by {sig}" + (f" (its last error line: {line})" if line else "")
    return line or f"exited with code {code} (no error output)"


def launch(n: int, command: Sequence[str], *, port: int | None = None, grace: float = GRACE_S,
           verbose: bool = False) -> int:
    """Run ``command`` as ranks 0..n-1 of a ring group over 127.0.0.1; the exit code (see
    the module docstring)."""
    if n < 1:
        raise ConfigError(f"launch: -n {n}: the number of ranks must be 1 or more ({USAGE})")
    if not command:
        raise ConfigError(f"launch: no command to run; put it after `--` ({USAGE})")
    if port is not None and not 1024 <= port <= 65535 - n:
        raise ConfigError(f"launch: --port {port} is out of range; use a port in 1024..{65535 - n} (rank r "
                          "listens on port + r) or leave --port out to pick free ports")
    ports = free_ports(n) if port is None else [port + r for r in range(n)]
    with tempfile.TemporaryDirectory(prefix="mozgach_launch_") as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(ring_hostfile(ports))
        return _run(n, list(command), hostfile, grace, verbose)


def _run(n: int, command: list[str], hostfile: Path, grace: float, verbose: bool) -> int:
    out_lock = threading.Lock()
    exits: queue.Queue = queue.Queue()
    ranks: list[_Rank] = []
    stopping = threading.Event()

    def stop_all(sig: int = signal.SIGTERM) -> None:
        for r in ranks:
            if r.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    r.proc.send_signal(sig)

    def on_signal(signum, _frame) -> None:
        stopping.set()
        exits.put((None, signum))  # wake the main loop

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for r in range(n):  # every rank forked before any thread starts (preexec_fn and threads)
            ranks.append(_Rank(r, command, rank_env(r, hostfile, n, verbose=verbose), out_lock))
        for rk in ranks:
            rk.start_readers()
            threading.Thread(target=lambda rk=rk: exits.put((rk, rk.proc.wait())), daemon=True).start()
        code, failed, running = 0, None, n
        while running:
            rk, rc = exits.get()  # blocks; a signal handler or a rank's exit wakes it
            if rk is None:  # the launcher was asked to stop: pass it on once
                if failed is None and code == 0:
                    code = 128 + rc
                    stop_all(signal.SIGINT if rc == signal.SIGINT else signal.SIGTERM)
                    _kill_later(ranks, grace)
                continue
            running -= 1
            if rc != 0 and failed is None and not stopping.is_set():
                failed, code = rk, exit_code(rc)
                for t in rk.readers:  # its last words, before the verdict
                    t.join(timeout=2)
                with out_lock:
                    sys.stderr.write(f"rank {rk.rank} failed: {_why(rk)}\n")
                    sys.stderr.flush()
                stopping.set()
                stop_all()
                _kill_later(ranks, grace)
        for rk in ranks:
            for t in rk.readers:
                t.join(timeout=5)
        return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for rk in ranks:  # nothing outlives the launcher
            if rk.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    rk.proc.kill()
                rk.proc.wait()


def _kill_later(ranks: list[_Rank], grace: float) -> None:
    """SIGKILL the ranks still running ``grace`` seconds from now (a timer thread)."""
    def kill() -> None:
        for r in ranks:
            if r.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    r.proc.kill()

    t = threading.Timer(grace, kill)
    t.daemon = True
    t.start()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mozgach launch", usage=USAGE,
                                 description="Start N local ranks of an mx.distributed job (ring over 127.0.0.1).")
    ap.add_argument("-n", "--ranks", type=int, required=True, help="how many ranks (processes) to start")
    ap.add_argument("--port", type=int, default=None, help="rank r listens on PORT + r (default: free ports)")
    ap.add_argument("--grace", type=float, default=GRACE_S,
                    help=f"seconds between SIGTERM and SIGKILL when the ranks are stopped (default {GRACE_S:g})")
    ap.add_argument("--verbose", action="store_true", help="MLX_RING_VERBOSE=1 in the ranks")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command of every rank, after `--`")
    args = ap.parse_args(list(argv))
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return launch(args.ranks, args.command, port=args.port, grace=args.grace, verbose=args.verbose)
    except ConfigError as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
