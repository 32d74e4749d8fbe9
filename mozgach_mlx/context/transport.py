"""Moving arrays round the ring: ``mx.distributed`` send/recv in an order that cannot
deadlock, evaluated at once, with the bytes counted.

MLX 0.32.4's ring backend (TCP) sends synchronously: a ``send`` returns when the peer has
received, so two ranks that both send first wait for each other forever (measured: it
hangs even for 4 KB). Every exchange here is "send to rank r+1, receive from rank r-1",
done by even ranks as send-then-receive and by odd ranks as receive-then-send; each
pair meets, and with an odd number of ranks the chain still ends (odd ranks always
receive first). Each send and receive is evaluated at once (``mx.eval``): the order of
communication is then the order of the Python program, the same on every rank, never
the order in which MLX happens to schedule a lazy graph. (``sum_scatter`` is "not
supported" by the ring backend and MLX has no ``all_to_all``: only send/recv,
all_gather and all_sum are there to build on.)
"""

from __future__ import annotations

import mlx.core as mx


class RingTransport:
    """send/recv round an ``mx.distributed`` group (rank r sends to r+1, receives from r-1)."""

    def __init__(self, group) -> None:
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.bytes_sent = 0
        self.messages = 0

    def exchange(self, sends: list[mx.array], recvs: list[tuple[tuple[int, ...], mx.Dtype]]) -> list[mx.array]:
        """Send ``sends`` to rank r+1 and receive arrays of the (shape, dtype) ``recvs``
        from rank r-1 (either may be empty; rank r-1's sends must match ``recvs``)."""
        right, left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        got: list[mx.array] = []

        def send_all():
            for x in sends:
                mx.eval(mx.distributed.send(x, right, group=self.group))
                self.bytes_sent += x.nbytes
                self.messages += 1

        def recv_all():
            for shape, dtype in recvs:
                y = mx.distributed.recv(shape, dtype, left, group=self.group)
                mx.eval(y)
                got.append(y)

        if self.rank % 2 == 0:
            send_all()
            recv_all()
        else:
            recv_all()
            send_all()
        return got


def drive(steps, transport) -> object:
    """Run a ring generator (:mod:`.ring`): every ``(sends, recvs)`` it yields goes
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
    generator's return value. Checks that every received array has the shape and dtype
    its receiver expects."""
    n = len(steps)
    msgs, done = [None] * n, [None] * n
    for r, g in enumerate(steps):
        msgs[r] = next(g)
    while True:
        live = [r for r in range(n) if done[r] is None]
        if not live:
            return done
        if len(live) != n:
            raise RuntimeError("ring generators of different lengths")
        outgoing = [msgs[r][0] for r in range(n)]
        for r in range(n):
            got = outgoing[(r - 1) % n]
            want = msgs[r][1]
            if [(tuple(a.shape), a.dtype) for a in got] != [(tuple(s), d) for s, d in want]:
                raise RuntimeError(f"rank {r} expected {want}, rank {(r - 1) % n} sent "
                                   f"{[(a.shape, a.dtype) for a in got]}")
        for r in range(n):
            try:
                msgs[r] = steps[r].send(outgoing[(r - 1) % n])
            except StopIteration as stop:
                done[r] = stop.value
