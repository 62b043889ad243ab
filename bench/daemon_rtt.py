"""Request round trips for bench/daemon_bench.py: a bare ZeroMQ ROUTER + msgpack echo
server, and a pool of client processes that time synchronous requests.

    python bench/daemon_rtt.py echo ipc:///tmp/x/echo.sock   # the echo server (SIGTERM stops it)

Clients (one process each, so 16 clients are 16 processes, like 16 sllmctl users):

- "raw-status" / "raw-ping": a bare DEALER that sends sllmd's own encoded `status` (or
  `ping`) message and msgpack-decodes the reply. Pointed at the echo server it gets its
  request back; pointed at sllmd (after the hello handshake, outside the timed loop) it
  gets the daemon's answer. Same client code, same bytes out: the difference is the server.
- "client-status": `sllmd.client.Client.status()`, what a Python user calls (its own
  encode/validate/decode on top).

Each client connects, warms up, waits for a common start time, then loops for
`duration` seconds, one request outstanding at a time, timing each with perf_counter.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import time

WARMUP = 20


# --- the echo server ----------------------------------------------------------------------------
def echo_server(address: str) -> None:
    """ROUTER bound on `address`: each request frame is msgpack-decoded and the same object
    re-encoded and sent back. One thread; the loop is all there is."""
    import msgpack
    import zmq

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    print("READY", flush=True)
    while not stop:
        if not sock.poll(200):
            continue
        peer, frame = sock.recv_multipart()
        sock.send_multipart([peer, msgpack.packb(msgpack.unpackb(frame))])
    sock.close()
    ctx.term()


# --- clients -------------------------------------------------------------------------------------
def _raw_session(address: str, handshake: bool, what: str):
    """(call, close) for a bare DEALER sending sllmd's encoded `what` messages."""
    import msgpack
    import zmq

    from sllmd.protocol import PROTOCOL_VERSION, Hello, Ping, Status, encode

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    make = Status if what == "status" else Ping
    ids = iter(range(1, 1 << 62))
    if handshake:
        sock.send(encode(Hello(id=next(ids), version=PROTOCOL_VERSION, client="bench")))
        if not sock.poll(10_000):
            raise RuntimeError(f"no welcome from {address}")
        reply = msgpack.unpackb(sock.recv())
        if reply.get("type") != "welcome":
            raise RuntimeError(f"handshake failed: {reply}")

    def call() -> int:
        sock.send(encode(make(id=next(ids))))
        frame = sock.recv()
        msgpack.unpackb(frame)
        return len(frame)

    def close() -> None:
        sock.close()
        ctx.term()
    return call, close


def _client_session(address: str):
    from sllmd.client import Client
    c = Client(address.removeprefix("ipc://"), timeout=30)
    return (lambda: (c.status(), 0)[1]), c.close


def _worker(conn) -> None:
    """A client process: runs ("run", address, kind, handshake, duration, start_at) commands until "exit"."""
    while True:
        cmd = conn.recv()
        if cmd[0] == "exit":
            return
        _, address, kind, handshake, duration, start_at = cmd
        try:
            if kind == "client-status":
                call, close = _client_session(address)
            else:
                what = kind.split("-", 1)[1]
                call, close = _raw_session(address, handshake, what)
            try:
                size = 0
                for _ in range(WARMUP):
                    size = call()
                lat = []
                while time.time() < start_at:
                    time.sleep(min(0.005, max(0.0, start_at - time.time())))
                t_end = time.perf_counter() + duration
                while True:
                    t0 = time.perf_counter()
                    if t0 >= t_end:
                        break
                    call()
                    lat.append(time.perf_counter() - t0)
            finally:
                close()
            conn.send({"latencies": lat, "reply_bytes": size})
        except Exception as e:  # reported to the parent, the worker lives on
            conn.send({"error": f"{type(e).__name__}: {e}"})


class ClientPool:
    """`n` client processes, started once (spawned: no ZeroMQ context crosses a fork)."""

    def __init__(self, n: int):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child,), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, address: str, kind: str, clients: int, duration: float, *, handshake: bool = True,
            lead: float = 1.5) -> dict:
        """`clients` of the pool's processes hammer `address` for `duration` s; pooled latencies.
        handshake=False for the echo server (it would only echo the hello)."""
        start_at = time.time() + lead   # time to connect, say hello and warm up
        for conn in self.conns[:clients]:
            conn.send(("run", address, kind, handshake, duration, start_at))
        results = [conn.recv() for conn in self.conns[:clients]]
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            return {"error": "; ".join(sorted(set(errors)))}
        lat = sorted(x for r in results for x in r["latencies"])
        if not lat:
            return {"error": "no request completed"}
        return {"clients": clients, "requests": len(lat), "duration_s": duration,
                "rps": len(lat) / duration, "p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99),
                "mean_s": sum(lat) / len(lat), "reply_bytes": results[0]["reply_bytes"]}

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("exit",))
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()


def _pct(sorted_xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of sorted values."""
    k = max(0, min(len(sorted_xs) - 1, int(round(q / 100 * len(sorted_xs) + 0.5)) - 1))
    return sorted_xs[k]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "echo":
        echo_server(sys.argv[2])
    else:
        sys.exit("usage: daemon_rtt.py echo ADDRESS")
