"""Moving arrays round the ring, lazily, in an order every rank shares.

Each ring step is an exchange "send to rank r+1, receive from rank r-1" of a few
*slots* (the K/V block, the dK/dV accumulator). What MLX 0.32.4 offers, measured here:

* ``send`` / ``recv`` on the ring backend are synchronous (two ranks that both send
  first wait forever, even for 4 KB), and a ``recv`` has no inputs, so inside one lazy
  graph nothing fixes when it runs: two ranks can schedule their receives differently
  and deadlock. Evaluating each send/recv at once (``mx.eval``) fixes the order, but
  inside ``value_and_grad`` MLX keeps the graph of everything evaluated during the
  trace: every score block of the ring stayed alive (8.6 GiB for one 4K attention
  instead of 26 MiB).
* ``all_gather`` has an input, so chaining its input on the previous step's results
  (``mx.depends``) puts every collective of a step in one order on every rank, inside
  the lazy graph, with no deadlock. ``sum_scatter`` is "not supported" by the ring
  backend and there is no ``all_to_all``.

So a slot travels by ``all_gather`` of every rank's message padded to the largest,
and rank r keeps rank r-1's. With two ranks that is exactly a ring exchange (each rank
sends one block, receives one); with N > 2 each rank also receives the N - 2 blocks it
does not need (N - 1 times a ring's bytes): a true send/recv ring for N > 2 needs an
ordering primitive for ``recv`` that MLX does not have yet. A slot no rank sends in
(every receiver's mask hides it) is skipped by all ranks alike.
"""

from __future__ import annotations

import mlx.core as mx


class Slot:
    """One array of a ring step: what this rank sends (or None), what it receives
    ((shape, dtype) or None), and the largest message of any rank (0: nobody sends)."""

    def __init__(self, send: mx.array | None, recv: tuple | None, dtype: mx.Dtype, largest: int) -> None:
        self.send, self.recv, self.dtype, self.largest = send, recv, dtype, largest


class RingTransport:
    """Ring exchanges over an ``mx.distributed`` group (lazy; see the module docstring)."""

    def __init__(self, group) -> None:
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.bytes_sent = 0  # what this rank's messages hold (padding excluded)
        self.bytes_gathered = 0  # what the all_gathers moved in (N - 1 padded messages each)
        self.messages = 0
        self.last: mx.array | None = None  # the latest all_gather: the next one waits for it

    def settle(self, outputs: list[mx.array]) -> list[mx.array]:
        """``outputs`` made to wait for every exchange so far (a gathered block this rank
        does not use would otherwise drop out of the graph, and its peers would wait).

        The chain is never cut: the first exchange of the next call (the other S² half,
        the next layer, the backward) waits for this one, so every rank runs its
        collectives in the order the Python program created them. Cut per call, the two
        S² halves' rings were independent and two ranks swapped their blocks (measured:
        a 15% gradient error, no hang)."""
        return outputs if self.last is None else mx.depends(outputs, [self.last])

    def exchange(self, slots: list[Slot], after: list[mx.array]) -> list[mx.array | None]:
        out: list[mx.array | None] = []
        after = list(after) + ([self.last] if self.last is not None else [])
        for slot in slots:
            if slot.largest == 0:
                out.append(None)
                continue
            msg = mx.zeros((slot.largest,), slot.dtype) if slot.send is None else slot.send.reshape(-1)
            if msg.size < slot.largest:
                msg = mx.concatenate([msg, mx.zeros((slot.largest - msg.size,), slot.dtype)])
            if after:
                msg = mx.depends(msg, after)
            got = mx.distributed.all_gather(msg[None], group=self.group)  # (N, largest)
            after, self.last = [got], got
            if slot.send is not None:
                self.bytes_sent += slot.send.nbytes
                self.messages += 1
            self.bytes_gathered += (self.size - 1) * slot.largest * slot.dtype.size
            if slot.recv is None:
                out.append(None)
            else:
                shape, _ = slot.recv
                n = 1
                for d in shape:
                    n *= d
                out.append(got[(self.rank - 1) % self.size, :n].reshape(shape))
        return out


def drive(steps, transport) -> object:
    """Run a ring generator (:mod:`.ring`): every ``(slots, after)`` it yields goes
    through ``transport.exchange``; returns the generator's return value."""
    try:
        msg = next(steps)
        while True:
            msg = steps.send(transport.exchange(*msg))
    except StopIteration as stop:
        return stop.value


def simulate(steps: list) -> list:
    """Run the ring generators of all N ranks in one process, in lockstep, delivering
    rank r's sends to rank r+1 (the tests' ring without processes); returns each
    generator's return value. Checks that every rank agrees on which slots travel and
    that each received array has the shape and dtype its receiver expects."""
    n = len(steps)
    msgs, done = [None] * n, [None] * n
    for r, g in enumerate(steps):
        msgs[r] = next(g)
    while not all(d is not None for d in done):
        if any(d is not None for d in done):
            raise RuntimeError("ring generators of different lengths")
        slots = [m[0] for m in msgs]
        if len({tuple(s.largest for s in sl) for sl in slots}) != 1:
            raise RuntimeError(f"ranks disagree on the slot sizes: {[[s.largest for s in sl] for sl in slots]}")
        for r in range(n):
            for mine, theirs in zip(slots[r], slots[(r - 1) % n], strict=True):
                sent = None if theirs.send is None else (tuple(theirs.send.shape), theirs.send.dtype)
                want = None if mine.recv is None else (tuple(mine.recv[0]), mine.recv[1])
                if sent != want:
                    raise RuntimeError(f"rank {r} expects {want}, rank {(r - 1) % n} sends {sent}")
                if theirs.send is not None and theirs.send.size > mine.largest:
                    raise RuntimeError("a message larger than its slot")
        for r in range(n):
            got = [s.send for s in slots[(r - 1) % n]]
            try:
                msgs[r] = steps[r].send(got)
            except StopIteration as stop:
                done[r] = stop.value
    return done
