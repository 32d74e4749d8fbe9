"""Data- and adapter-parallel training over ``mx.distributed`` (processes started by
``mozgach launch`` on one machine, or ``mlx.launch``: ring over TCP, MPI, JACCL over
Thunderbolt 5, NCCL on CUDA).

Two ways to use a group of W processes (``--distributed``):

``data``      every rank trains the same adapter; rank r computes the micro-batches
              ``r, r + W, ...`` of every optimizer step (``grad_accumulation`` must be a
              multiple of W), the summed LoRA gradients, loss sums and token counts are
              ``all_sum``-ed in a few flat buckets (never the base), and every rank takes
              the same optimizer step, so the optimizer states stay identical. The loss
              sequence is the single process's with the same global batch (within fp32
              summation order). Only rank 0 writes files and logs.
``adapters``  each rank trains whole adapters, the domains assigned to it by the tokens
              each adapter will go through (:func:`balance`), with no collective while it trains: rank 0 records its
              own in ``manifest.json``, every other rank its own in
              ``manifest.rank{r}.json``; at the end (and at the start of a resumed run)
              rank 0 merges the parts, and only the adapter files it does not hold
              travel, to rank 0 only (:func:`send_to_main`; the machines need not share a
              disk).

What every collective here relies on: all ranks call them in the same order. A rank that
fails a check must not leave the others waiting, so checks run on every rank and their
outcome is agreed (:func:`together`) before anyone goes on. A rank that dies while the
others train (adapter-parallel) is not noticed by them until the end-of-run merge; it is
the launcher's job to stop them at once: ``mozgach launch`` and ``mlx.launch`` both stop
the other ranks when one exits non-zero (``mozgach launch`` also exits with its code and
one line ``rank N failed: ...``). A ring collective with a dead peer raises at once
("connection to a peer was lost"): the survivors of a job started without such a launcher
end at the merge, not hang.

The run directory's lock (``OUT/.lock``) is held by rank 0 only (:func:`hold`): the ranks
of one job never lock each other out, and a second, unrelated job on the same ``--out`` is
refused on all of its ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import ConfigError, MozgachError
from .rundir import locked

MODES = ("none", "data", "adapters", "context")  # context: mozgach_mlx.context
BUCKET_BYTES = 64 << 20  # one all_sum per this many bytes of gradients (few calls, bounded copies)

LAUNCH_HINT = ("e.g. `mozgach launch -n 2 -- mozgach train --distributed {mode} ...` on one machine, "
               "`mlx.launch --hostfile hosts.json -- mozgach train --distributed {mode} ...` over several")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"--distributed {mode!r} is not one of {', '.join(MODES)}")
    return mode


def init(mode: str):
    """The process group of a ``--distributed`` mode: None for ``none``, else the group
    ``mlx.launch`` set up (ConfigError when this process is alone or the group fails)."""
    if check_mode(mode) == "none":
        return None
    try:
        group = mx.distributed.init(strict=False)
    except RuntimeError as e:
        raise ConfigError(f"--distributed {mode}: the process group did not start ({' '.join(str(e).split())}); "
                          f"launch every rank with mozgach launch or mlx.launch ({LAUNCH_HINT.format(mode=mode)})"
                          ) from None
    if group.size() < 2:
        raise ConfigError(f"--distributed {mode} needs 2 or more processes started by a launcher, but this "
                          f"process is alone (world size 1); launch it with {LAUNCH_HINT.format(mode=mode)}, "
                          "or use --distributed none")
    return group


def rank(group) -> int:
    return 0 if group is None else group.rank()


def size(group) -> int:
    return 1 if group is None else group.size()


def is_main(group) -> bool:
    return rank(group) == 0


# ----------------------------------------------------------------------------- collectives


def all_sum_tree(tree: Any, group, bucket_bytes: int = BUCKET_BYTES) -> Any:
    """The elementwise sum over the group of a tree of arrays, in few ``all_sum`` calls:
    leaves, in the order of their names (the same on every rank whatever the order the
    tree was built in), are concatenated by dtype into flat buckets of up to
    ``bucket_bytes`` (a leaf bigger than that is its own bucket)."""
    flat = tree_flatten(tree)
    if group is None or not flat:
        return tree
    out: dict[str, mx.array] = {}
    for bucket in _buckets(sorted(flat, key=lambda kv: kv[0]), bucket_bytes):
        names = [k for k, _ in bucket]
        arrays = [v for _, v in bucket]
        summed = mx.distributed.all_sum(mx.concatenate([a.reshape(-1) for a in arrays]), group=group)
        offsets = np.cumsum([0] + [a.size for a in arrays])
        for name, a, lo, hi in zip(names, arrays, offsets[:-1], offsets[1:], strict=True):
            out[name] = summed[int(lo):int(hi)].reshape(a.shape)
    return tree_unflatten([(k, out[k]) for k, _ in flat])


def _buckets(flat: list, bucket_bytes: int) -> Iterator[list]:
    bucket: list = []
    used = 0
    for k, v in flat:
        if bucket and (v.dtype != bucket[0][1].dtype or used + v.nbytes > bucket_bytes):
            yield bucket
            bucket, used = [], 0
        bucket.append((k, v))
        used += v.nbytes
    if bucket:
        yield bucket


def count_all_sum_calls(tree: Any, bucket_bytes: int = BUCKET_BYTES) -> int:
    """How many ``all_sum`` calls :func:`all_sum_tree` makes for ``tree``."""
    return sum(1 for _ in _buckets(sorted(tree_flatten(tree), key=lambda kv: kv[0]), bucket_bytes))


def broadcast_tree(tree: Any, group) -> Any:
    """Rank 0's values of a tree of arrays, on every rank (the others contribute zeros)."""
    if group is None:
        return tree
    if not is_main(group):
        tree = tree_unflatten([(k, mx.zeros_like(v)) for k, v in tree_flatten(tree)])
    out = all_sum_tree(tree, group)
    mx.eval(out)
    return out


class GroupLost(MozgachError):
    """A collective failed or returned data that is not what the ranks sent: a rank left
    the group (died, was killed) or the ranks ran different code."""


_calls = [0]  # all_gather_bytes calls of this process: the same count on every rank


def all_gather_bytes(data: bytes, group) -> list[bytes]:
    """Every rank's ``data`` (any lengths), in rank order. Each part travels with its
    rank, this call's sequence number and its sha256, checked on arrival: with a peer
    gone, MLX's ring collectives were seen to raise, to hang, and to return zeros, and
    the last must not pass for data (:class:`GroupLost`)."""
    if group is None:
        return [data]
    _calls[0] += 1
    me, head = rank(group), _HEAD.size
    framed = _HEAD.pack(_MAGIC, _calls[0], me) + hashlib.sha256(data).digest() + data
    try:
        lengths = mx.distributed.all_gather(mx.array([len(framed)], dtype=mx.int64), group=group)
        lengths = [int(n) for n in np.array(lengths)]
        longest = max(lengths)
        buf = np.zeros(longest, np.uint8)
        buf[: len(framed)] = np.frombuffer(framed, np.uint8)
        gathered = np.array(mx.distributed.all_gather(mx.array(buf), group=group)).reshape(len(lengths), longest)
    except RuntimeError as e:
        raise GroupLost(f"rank {me}: a collective failed ({' '.join(str(e).split())}): a rank left the group") from None
    out = []
    for r, n in enumerate(lengths):
        part = gathered[r, :n].tobytes() if n >= head + 32 else b""
        body = part[head + 32:]
        if len(part) < head + 32 or _HEAD.unpack(part[:head]) != (_MAGIC, _calls[0], r) or \
                hashlib.sha256(body).digest() != part[head:head + 32]:
            raise GroupLost(f"rank {me}: the data gathered from rank {r} is not what it sent: a rank left the group "
                            "(or the ranks run different code)")
        out.append(body)
    return out


_MAGIC = 0x6D7A6731  # "mzg1"
_HEAD = struct.Struct("<IQi")


def all_gather_json(obj: Any, group) -> list[Any]:
    """Every rank's JSON-able ``obj``, in rank order."""
    return [json.loads(b) for b in all_gather_bytes(json.dumps(obj).encode(), group)]


def broadcast_json(obj: Any, group) -> Any:
    """Rank 0's JSON-able ``obj`` on every rank (what the others pass is ignored)."""
    return all_gather_json(obj if is_main(group) else None, group)[0]


def send_to_main(data: bytes, sizes: list[int], group) -> list[bytes]:
    """Rank 0 receives every rank's ``data`` (``sizes[r]`` bytes from rank r, known to
    every rank); the other ranks receive nothing (``[]``). The bytes go to rank 0 only,
    hop by hop over neighbours (r -> r-1 -> ... -> 0: the ring backend sends only to its
    neighbours), one ``send``/``recv`` pair per hop; ranks with nothing to send send
    nothing."""
    if group is None:
        return [data]
    me = rank(group)
    if len(data) != sizes[me]:
        raise ValueError(f"send_to_main: rank {me} has {len(data)} bytes, not the announced {sizes[me]}")
    got = [data] if me == 0 else []
    for src in range(1, size(group)):
        if not sizes[src]:
            if me == 0:
                got.append(b"")
            continue
        buf = mx.array(np.frombuffer(data, np.uint8)) if me == src else None
        for hop in range(src, 0, -1):  # hop -> hop - 1
            if me == hop:
                mx.eval(mx.distributed.send(buf, hop - 1, group=group))
                buf = None
            elif me == hop - 1:
                buf = mx.distributed.recv((sizes[src],), mx.uint8, hop, group=group)
                mx.eval(buf)
        if me == 0:
            got.append(np.array(buf).tobytes())
    return got


def together(group, fn: Callable[[], Any], *, main_only: bool = False) -> Any:
    """Run ``fn`` (on rank 0 only with ``main_only``) and agree on the outcome: if it
    raised a :class:`MozgachError` on any rank, every rank raises it (one line, naming the
    rank), so no rank is left waiting in a collective for one that gave up."""
    value, error, caught = None, None, None
    if not main_only or is_main(group):
        try:
            value = fn()
        except MozgachError as e:
            if group is None:
                raise
            error, caught = f"{type(e).__name__}|{' '.join(str(e).split())}", e
    if group is None:
        return value
    errors = all_gather_json(error, group)
    for r, err in enumerate(errors):
        if err is not None:
            if r == rank(group):
                raise caught
            kind, msg = err.split("|", 1)
            raise _error_type(kind)(f"rank {r}: {msg}")
    return value


def _error_type(name: str) -> type[MozgachError]:
    from . import errors

    typ = getattr(errors, name, None)
    return typ if isinstance(typ, type) and issubclass(typ, MozgachError) else MozgachError


def barrier(group) -> None:
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group))


def check_same(group, **fingerprints: str) -> None:
    """ConfigError on every rank unless all ranks have the same value of each
    fingerprint (e.g. ``config=``, ``base=``, ``data=``), naming the first that differs."""
    if group is None:
        return
    everyone = all_gather_json(fingerprints, group)
    for key, mine in everyone[0].items():
        for r, theirs in enumerate(everyone[1:], start=1):
            if theirs.get(key) != mine:
                raise ConfigError(f"rank {r} and rank 0 disagree on the {key} (fingerprints {theirs.get(key)} vs "
                                  f"{mine}); launch every rank with the same command, model and data")


def digest(obj: Any) -> str:
    """A short hash of a JSON-able object (what :func:`check_same` compares)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def hold(out: str | Path, group) -> Iterator[Path]:
    """:func:`rundir.locked` for a job: rank 0 holds ``OUT/.lock``, the other ranks do not
    lock (they write under rank 0's lock, or on their own machine's copy of ``OUT``); if
    rank 0 is refused, every rank raises its ConfigError."""
    with contextlib.ExitStack() as stack:
        together(group, lambda: stack.enter_context(locked(out)), main_only=True)
        yield Path(out)


# ----------------------------------------------------------------------------- data parallel


def check_data_parallel(grad_accumulation: int, group) -> None:
    """ConfigError unless the micro-batches of an optimizer step split evenly over the ranks."""
    w = size(group)
    if grad_accumulation % w:
        raise ConfigError(f"--grad-accumulation {grad_accumulation} is not a multiple of the {w} ranks: "
                          f"each rank takes grad_accumulation / ranks micro-batches of every optimizer step; "
                          f"use --grad-accumulation {w * max(1, -(-grad_accumulation // w))}")


def my_micro_batches(grad_accumulation: int, group) -> list[int]:
    """The micro-batch indices of an optimizer step that this rank computes."""
    return list(range(rank(group), grad_accumulation, size(group)))


def sum_scalars(values: list[float], group) -> list[float]:
    """The sums over the group of a few numbers (fp32: exact for counts below 2**24)."""
    if group is None:
        return list(values)
    summed = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=group)
    return [float(v) for v in np.array(summed)]


def sum_step(grads: Any, loss_sum: float, tokens: int, group) -> tuple[Any, float, int]:
    """Sum over the ranks of an optimizer step's gradients, loss sum and token count.
    The two scalars travel in the first fp32 bucket (one call for a small adapter)."""
    if group is None:
        return grads, loss_sum, tokens
    summed = all_sum_tree({"grads": grads, "step": mx.array([loss_sum, float(tokens)], dtype=mx.float32)}, group)
    mx.eval(summed)
    loss, n = np.array(summed["step"]).tolist()
    return summed["grads"], float(loss), int(round(n))


# ----------------------------------------------------------------------------- adapter parallel


def balance(sizes: dict[int, int], n_ranks: int) -> list[list[int]]:
    """Assign items (id -> cost, e.g. tokens) to ``n_ranks`` ranks: largest first, each to the
    least loaded rank (ties: lower rank; LPT, within 4/3 of the best makespan). Each
    rank's list is in assignment order (largest first), the same on every rank."""
    loads = [0] * n_ranks
    plan: list[list[int]] = [[] for _ in range(n_ranks)]
    for item in sorted(sizes, key=lambda i: (-sizes[i], i)):
        r = min(range(n_ranks), key=lambda k: (loads[k], k))
        plan[r].append(item)
        loads[r] += sizes[item]
    return plan
