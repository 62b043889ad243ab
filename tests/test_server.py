"""The server: streaming, cancellation, robustness against malformed input, busy, heartbeats, transports.

Most tests run the real Server on a real ipc:// socket against `ScriptedNode`,
a small node that follows the Node interface with scripted timing, so that
cancellations and failures can be provoked and observed. One test throws
every kind of bad input at a real `sllmd` process.
"""
from __future__ import annotations

import os
import stat
import threading
import time

import msgpack
import pytest
import zmq

from daemon_helpers import DaemonProcess, ScriptedNode, remove_tree, short_tempdir
from sllmd.client import Client
from sllmd.errors import SllmError
from sllmd.protocol import (PROTOCOL_VERSION, BusyError, CancelledError, DaemonTimeoutError, DaemonUnreachableError,
                            Hello, InternalError, InvalidArgumentError, ShuttingDownError, Status, decode_reply,
                            encode)
from sllmd.errors import AddressInUseError
from sllmd.server import Server
from sllmd.errors import ModelNotFoundError
from sllmd.transport import MemoryTransport, ZmqTransport, make_socket

MAX_FRAME = 64 * 1024


class Served:
    def __init__(self, node, socket_path, server, transport):
        self.node, self.socket, self.server, self.transport = node, socket_path, server, transport

    def client(self, **kw) -> Client:
        return Client(self.socket, **kw)


@pytest.fixture
def serve():
    """serve(node=None, **server_kwargs) -> Served: a Server on a fresh ipc socket."""
    started = []

    def start(node=None, **kw):
        root = short_tempdir()
        path = str(root / "s.sock")
        transport = ZmqTransport()
        endpoint = transport.bind("ipc://" + path, max_frame_bytes=kw.get("max_frame_bytes", MAX_FRAME))
        kw.setdefault("max_frame_bytes", MAX_FRAME)
        kw.setdefault("heartbeat_s", 0.2)
        server = Server(node or ScriptedNode(), endpoint, **kw)
        server.start()
        served = Served(server.node, path, server, transport)
        started.append((served, root))
        return served

    yield start
    for served, root in started:
        served.server.close(timeout=2)
        served.transport.close()
        remove_tree(root)


class RawPeer:
    """A bare DEALER for sending what a well-behaved client never would."""

    def __init__(self, socket_path: str):
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER, connect="ipc://" + socket_path)

    def send(self, *frames: bytes):
        self.sock.send_multipart(list(frames))

    def recv(self, timeout=5.0):
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        frames = self.sock.recv_multipart()
        assert len(frames) == 1
        return decode_reply(frames[0])

    def recv_final(self, timeout=5.0):
        while True:
            msg = self.recv(timeout)
            if msg.TYPE != "heartbeat":
                return msg

    def hello(self):
        self.send(encode(Hello(id=0, version=PROTOCOL_VERSION)))
        assert self.recv().TYPE == "welcome"

    def close(self):
        self.sock.close(linger=0)
        self.ctx.term()


def test_unary_operations(serve):
    s = serve()
    with s.client() as c:
        assert c.welcome.version == PROTOCOL_VERSION and c.welcome.max_frame_bytes == MAX_FRAME
        assert c.ping() < 1.0
        status = c.status()
        assert status["uptime_s"] == 1.0 and status["daemon"]["protocol"] == PROTOCOL_VERSION
        assert status["daemon"]["pid"] == os.getpid()
        assert [m["name"] for m in c.models()] == ["echo"]
        assert c.load("echo", keep_alive="5m")["keep_alive"] == 300.0
        c.pin("echo")
        assert c.models()[0]["pinned"] is True
        c.unpin("echo")
        assert c.evict("echo", tier="dram")["evicted"] == ["dram"]
        assert c.ps() == []
        c.remove("echo")
        assert c.models() == []


def test_node_errors_come_back_as_their_classes(serve):
    s = serve()
    with s.client() as c:
        with pytest.raises(ModelNotFoundError, match="nope"):
            c.load("nope")
        with pytest.raises(InvalidArgumentError):       # refused before it is sent: a usage error
            c.load("../etc/passwd")
        s.node.status_error = RuntimeError("disk on fire")
        with pytest.raises(InternalError, match="disk on fire"):
            c.status()
        s.node.models_result = [object()]                # a result that cannot be encoded
        with pytest.raises(InternalError):
            c.models()
        s.node.status_error = None
        assert c.status()["uptime_s"] == 1.0


def test_infer_streams_tokens_in_order(serve):
    s = serve()
    s.node.token_delay = 0.01
    with s.client() as c:
        stream = c.infer("echo", "the capital of France is Paris", max_tokens=6)
        assert list(stream) == ["the ", "capital ", "of ", "France ", "is ", "Paris "]
        assert stream.stats == {"tokens": 6, "model": "echo"}
        events = list(c.infer("echo", "a b", max_tokens=2).events())
        assert [e["type"] for e in events] == ["token", "token", "done"]
        assert events[1]["token_id"] == 1
        assert c.generate("echo", "x y z", max_tokens=3) == "x y z "
    assert s.node.streams_finished == ["the capital of France is Paris", "a b", "x y z"]


def test_interleaved_requests_on_one_client(serve):
    s = serve()
    s.node.token_delay = 0.02
    with s.client() as c:
        stream = iter(c.infer("echo", "one two three four", max_tokens=4))
        assert next(stream) == "one "
        assert c.status()["uptime_s"] == 1.0          # a second request while the stream is open
        assert list(stream) == ["two ", "three ", "four "]


def test_import_forwards_progress(serve, tmp_path):
    s = serve()
    seen = []
    with s.client() as c:
        info = c.import_model("smol", tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert info["source"] == str(tmp_path)            # made absolute by the client
    assert seen[-1] == (100, 100) and all(t == 100 for _, t in seen)


def test_garbage_gets_typed_errors_and_the_server_keeps_serving(serve):
    s = serve()
    peer = RawPeer(s.socket)
    try:
        peer.hello()
        good = msgpack.packb({"type": "infer", "id": 5, "model": "echo", "prompt": "a " * 50})
        cases = [
            (b"\xc1\xc1garbage", "bad_message", None),
            (b"", "bad_message", None),
            (good[:-7], "bad_message", 5),                                     # truncated msgpack
            (msgpack.packb({"type": "load", "id": 6, "name": 7}), "bad_message", 6),          # wrong field type
            (msgpack.packb({"type": "infer", "id": 7, "model": "echo", "prompt": "x", "max_tokens": "3"}),
             "bad_message", 7),
            (msgpack.packb({"type": "frobnicate", "id": 8}), "unknown_type", 8),
            (msgpack.packb({"type": "welcome", "id": 9}), "unknown_type", 9),
            (msgpack.packb({"type": "status", "id": 10, "x": 1}), "bad_message", 10),
            (msgpack.packb({"type": "status", "id": 11, "pad": "x" * MAX_FRAME}), "oversized", 11),
            (msgpack.packb(["status", 12]), "bad_message", None),
        ]
        for frame, code, rid in cases:
            peer.send(frame)
            reply = peer.recv()
            assert (reply.TYPE, reply.code, reply.id) == ("error", code, rid), (frame[:40], reply)
            peer.send(encode(Status(id=100)))
            assert peer.recv().TYPE == "result"
        peer.send(encode(Status(id=200)), b"second frame")
        reply = peer.recv()
        assert reply.code == "bad_message" and "one frame" in reply.message
    finally:
        peer.close()
    with s.client() as c:
        assert c.status()["uptime_s"] == 1.0


def test_a_frame_over_the_hard_cap_drops_only_that_connection(serve):
    s = serve()
    peer = RawPeer(s.socket)
    try:
        peer.hello()
        peer.send(b"\x00" * (MAX_FRAME * 4 + 1))
        assert not peer.sock.poll(300)                      # no reply: ZeroMQ dropped the connection
        with s.client() as c:
            assert c.status()["uptime_s"] == 1.0
    finally:
        peer.close()


def test_handshake_is_required_and_versions_must_match(serve):
    s = serve()
    peer = RawPeer(s.socket)
    try:
        peer.send(encode(Status(id=1)))
        reply = peer.recv()
        assert reply.code == "handshake_required" and reply.id == 1
        peer.send(encode(Hello(id=2, version=PROTOCOL_VERSION + 1)))
        reply = peer.recv()
        assert reply.code == "version_mismatch" and reply.id == 2
        peer.hello()
        peer.send(encode(Status(id=3)))
        assert peer.recv().TYPE == "result"
    finally:
        peer.close()


def test_duplicate_request_ids_are_refused(serve):
    s = serve()
    s.node.token_delay = 0.05
    peer = RawPeer(s.socket)
    try:
        peer.hello()
        infer = msgpack.packb({"type": "infer", "id": 4, "model": "echo", "prompt": "a b c d e f"})
        peer.send(infer)
        assert peer.recv().TYPE == "token"
        peer.send(infer)
        while (reply := peer.recv()).TYPE != "error":
            pass
        assert reply.code == "bad_message" and "already in flight" in reply.message
    finally:
        peer.close()


def test_client_disconnect_mid_stream_cancels_the_request(serve):
    s = serve()
    s.node.token_delay = 0.02
    peer = RawPeer(s.socket)
    peer.hello()
    peer.send(msgpack.packb({"type": "infer", "id": 1, "model": "echo", "prompt": "w " * 10, "max_tokens": 100000}))
    assert peer.recv().TYPE == "token"
    peer.close()                                                     # goes away without a word
    assert s.node.wait_closed_early(1, timeout=5), "the node's generator was not closed"
    deadline = time.monotonic() + 5
    while s.server.in_flight() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s.server.in_flight() == 0
    with s.client() as c:
        assert c.generate("echo", "still here", max_tokens=2) == "still here "


def test_disconnect_while_waiting_for_the_first_token_cancels(serve):
    s = serve()
    s.node.token_delay = 0.5                                        # "prefill" takes a while
    peer = RawPeer(s.socket)
    peer.hello()
    peer.send(msgpack.packb({"type": "infer", "id": 1, "model": "echo", "prompt": "slow", "max_tokens": 1000}))
    time.sleep(0.1)
    peer.close()
    assert s.node.wait_closed_early(1, timeout=5)


def test_closing_a_stream_early_cancels_it(serve):
    s = serve()
    s.node.token_delay = 0.02
    with s.client() as c:
        for i, _piece in enumerate(c.infer("echo", "w", max_tokens=100000)):
            if i == 2:
                break
        assert s.node.wait_closed_early(1, timeout=5)
        assert c.status()["daemon"]["requests_in_flight"] == 0


def test_busy_when_long_requests_are_exhausted(serve):
    s = serve(max_streams=2)
    s.node.token_delay = 0.05
    with s.client() as c:
        streams = [iter(c.infer("echo", f"s{i}", max_tokens=1000)) for i in range(3)]
        assert next(streams[0]) == "s0 " and next(streams[1]) == "s1 "
        with pytest.raises(BusyError) as info:
            next(streams[2])
        assert info.value.exit_code == 75
        assert c.status()["uptime_s"] == 1.0                          # quick requests are still served
        for st in streams[:2]:
            st.close()
        assert s.node.wait_closed_early(2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:                            # the slots free up
            try:
                assert c.generate("echo", "again", max_tokens=1) == "again "
                break
            except BusyError:
                time.sleep(0.05)
        else:
            pytest.fail("still busy after the streams were closed")


def test_heartbeats_keep_a_slow_request_alive(serve):
    s = serve(heartbeat_s=0.1)
    s.node.load_delay = 1.2
    with s.client(timeout=0.5) as c:                                 # silence limit well under the load time
        assert c.load("echo")["state"] == "loaded"


class BareDaemon:
    """A ROUTER in a thread that says welcome, then follows `script(router, peer, msg)` per request."""

    def __init__(self, heartbeat_s: float, script):
        self.root = short_tempdir()
        self.socket = f"{self.root}/s.sock"
        self.ctx = zmq.Context()
        self.router = make_socket(self.ctx, zmq.ROUTER, bind="ipc://" + self.socket)
        self.heartbeat_s, self.script = heartbeat_s, script
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop)
        self.thread.start()

    def _loop(self):
        while not self.stop.is_set() and not self.router.closed:
            if not self.router.poll(50):
                continue
            peer, frame = self.router.recv_multipart()
            msg = msgpack.unpackb(frame)
            if msg["type"] == "hello":
                self.router.send_multipart([peer, msgpack.packb(
                    {"type": "welcome", "id": msg["id"], "version": PROTOCOL_VERSION, "server": "bare",
                     "max_frame_bytes": MAX_FRAME, "heartbeat_s": self.heartbeat_s})])
            else:
                self.script(self.router, peer, msg)

    def close(self):
        self.stop.set()
        self.thread.join()
        if not self.router.closed:
            self.router.close(0)
        self.ctx.term()
        remove_tree(self.root)


def test_a_silent_daemon_times_out():
    bare = BareDaemon(10.0, lambda router, peer, msg: None)         # welcomes, then never answers
    try:
        with Client(bare.socket, timeout=0.5) as c:
            start = time.monotonic()
            with pytest.raises(DaemonTimeoutError) as info:
                c.status()
            assert 0.4 < time.monotonic() - start < 3 and info.value.exit_code == 75
    finally:
        bare.close()


def test_a_daemon_that_goes_away_mid_request_is_unreachable():
    def beat_twice_then_die(router, peer, msg):
        for _ in range(2):
            router.send_multipart([peer, msgpack.packb({"type": "heartbeat", "id": msg["id"]})])
            time.sleep(0.1)
        router.close(0)                                              # the daemon is gone, its socket too

    bare = BareDaemon(0.1, beat_twice_then_die)
    try:
        with Client(bare.socket, timeout=30) as c:
            start = time.monotonic()
            with pytest.raises(DaemonUnreachableError, match="went away"):
                c.status()
            assert time.monotonic() - start < 5
    finally:
        bare.close()


def test_no_daemon_is_unreachable_at_once():
    root = short_tempdir()
    try:
        with pytest.raises(DaemonUnreachableError, match="not running"):
            Client(str(root / "none.sock"))
        import socket as pysocket
        stale = pysocket.socket(pysocket.AF_UNIX)
        stale.bind(str(root / "stale.sock"))                         # a socket file nobody listens on
        stale.close()
        with pytest.raises(DaemonUnreachableError, match="stale"):
            Client(str(root / "stale.sock"))
    finally:
        remove_tree(root)


def test_socket_file_mode_single_owner_and_stale_files():
    root = short_tempdir()
    transport = ZmqTransport()
    try:
        path = str(root / "sub" / "s.sock")
        ep = transport.bind("ipc://" + path, max_frame_bytes=MAX_FRAME)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(root / "sub").st_mode) == 0o700
        with pytest.raises(AddressInUseError, match="already listening"):
            transport.bind("ipc://" + path, max_frame_bytes=MAX_FRAME)
        ep.close()
        assert not os.path.exists(path)
        import socket as pysocket
        stale = pysocket.socket(pysocket.AF_UNIX)
        stale.bind(path)
        stale.close()
        ep = transport.bind("ipc://" + path, max_frame_bytes=MAX_FRAME, mode=0o660)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        ep.close()
        (root / "file").write_text("not a socket")
        with pytest.raises(AddressInUseError, match="not a socket"):
            transport.bind(f"ipc://{root}/file", max_frame_bytes=MAX_FRAME)
    finally:
        transport.close()
        remove_tree(root)


def test_stopping_refuses_new_requests_and_fails_running_ones(serve):
    s = serve()
    s.node.token_delay = 0.05
    with s.client() as c:
        stream = iter(c.infer("echo", "long", max_tokens=100000))
        assert next(stream) == "long "
        s.server.stop_accepting()
        with pytest.raises(ShuttingDownError) as info:
            c.status()
        assert info.value.exit_code == 75
        threading.Timer(0.2, s.server.close).start()
        with pytest.raises(ShuttingDownError) as info:   # the same answer as a new request gets
            for _ in stream:
                pass
        assert info.value.exit_code == 75
    assert s.node.wait_closed_early(1)


def test_memory_transport_serves_several_daemons_in_one_process():
    net = MemoryTransport()
    servers = []
    for name in ("alpha", "beta"):
        ep = net.bind(f"mem://{name}", max_frame_bytes=MAX_FRAME)
        server = Server(ScriptedNode(name), ep, max_frame_bytes=MAX_FRAME, heartbeat_s=0.2)
        server.start()
        servers.append(server)
    try:
        with Client("mem://alpha", transport=net) as a, Client("mem://beta", transport=net) as b:
            assert [m["name"] for m in a.models()] == ["alpha"]
            assert [m["name"] for m in b.models()] == ["beta"]
            assert b.generate("beta", "hi there", max_tokens=2) == "hi there "
        with pytest.raises(DaemonUnreachableError):
            Client("mem://gamma", transport=net)
        with pytest.raises(AddressInUseError):
            net.bind("mem://alpha", max_frame_bytes=MAX_FRAME)
    finally:
        for server in servers:
            server.close(timeout=2)


def test_a_slow_reader_gets_every_token_in_order():
    net = MemoryTransport(hwm=4)                                    # the client's queue holds 4 frames
    ep = net.bind("mem://slow", max_frame_bytes=MAX_FRAME)
    server = Server(ScriptedNode(), ep, max_frame_bytes=MAX_FRAME, heartbeat_s=0.2)
    server.start()
    try:
        with Client("mem://slow", transport=net) as c:
            stream = iter(c.infer("echo", " ".join(str(i) for i in range(200)), max_tokens=200))
            first = next(stream)
            time.sleep(0.3)                                          # the server backs up meanwhile
            rest = list(stream)
        assert [first, *rest] == [f"{i} " for i in range(200)]
    finally:
        server.close(timeout=2)


def test_a_real_sllmd_survives_bad_input():
    root = short_tempdir()
    try:
        with DaemonProcess(root, "--max-frame", "64KiB") as daemon:
            peer = RawPeer(daemon.socket)
            try:
                peer.send(encode(Status(id=1)))
                assert peer.recv().code == "handshake_required"
                peer.hello()
                for frame in (b"\xc1", msgpack.packb({"type": "status", "id": 2})[:-1],
                              msgpack.packb({"type": "load", "id": 3, "name": ["x"]}),
                              msgpack.packb({"type": "nope", "id": 4}),
                              msgpack.packb({"type": "status", "id": 5, "pad": "x" * 70_000})):
                    peer.send(frame)
                    assert peer.recv_final().TYPE == "error"
                peer.send(b"a", b"b")
                assert peer.recv_final().code == "bad_message"
            finally:
                peer.close()
            with Client(daemon.socket) as c:
                status = c.status()
                assert status["daemon"]["pid"] == daemon.proc.pid
                with pytest.raises(SllmError) as info:
                    c.load("absent")
                assert info.value.code == "model_not_found"
            assert daemon.stop() == 0
    finally:
        remove_tree(root)


# --- who may connect, and what a request may make the daemon read ------------------------------------
def test_tcp_sockets_are_refused_until_peer_traffic_has_curve_keys():
    from sllmd.config import ConfigError, load_config
    transport = ZmqTransport()
    try:
        with pytest.raises(ConfigError, match="CurveZMQ") as info:
            transport.bind("tcp://127.0.0.1:0", max_frame_bytes=MAX_FRAME)
        assert info.value.exit_code == 78
    finally:
        transport.close()
    with pytest.raises(ConfigError, match="CurveZMQ"):
        load_config({"socket": "tcp://0.0.0.0:7000"}, env={}, config_file="/dev/null")


def test_sllmd_with_a_tcp_socket_exits_78_with_one_line():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "sllmd", "--config", "/dev/null", "--socket", "tcp://127.0.0.1:7999",
                           "--store", "/nonexistent-sllm-store"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CurveZMQ" in lines[0], proc.stderr


def test_peer_address_credentials_are_parsed():
    from sllmd.transport.credentials import parse_peer_address
    c = parse_peer_address("localhost:1000:100:4242")
    assert (c.uid, c.gid, c.pid) == (1000, 100, 4242)
    for address in (None, "", "127.0.0.1", "tcp://1.2.3.4:5", "h:a:b:c"):
        assert parse_peer_address(address) is None


@pytest.mark.parametrize("mode, owner, group, uid, gids, want, allowed", [
    (0o600, 1, 1, 1, {1}, 4, True),       # the owner reads its own file
    (0o600, 1, 1, 2, {1}, 4, False),      # the group has no bits
    (0o640, 1, 1, 2, {1}, 4, True),       # ... now it has
    (0o640, 1, 1, 2, {7}, 4, False),      # another group: the "other" bits
    (0o604, 1, 1, 2, {7}, 4, True),
    (0o064, 1, 1, 1, {1}, 4, False),      # the owner gets the owner bits only, even when others may read
    (0o604, 1, 1, 2, {1}, 4, False),      # a group member gets the group bits only
    (0o700, 1, 1, 0, {0}, 4, True),       # root reads anything
    (0o000, 1, 1, 0, {0}, 4, True),
    (0o040700, 1, 1, 2, {1}, 1, False),   # a directory the group may not search
    (0o040710, 1, 1, 2, {1}, 1, True),
    (0o040750, 1, 1, 2, {1}, 5, True),    # list + search
    (0o040711, 1, 1, 2, {9}, 5, False),   # others may search but not list
])
def test_unix_permission_table(mode, owner, group, uid, gids, want, allowed):
    from sllmd.transport.credentials import may_access
    assert may_access(mode, owner, group, uid, frozenset(gids), want) is allowed


@pytest.mark.parametrize("acl, uid, gids, allowed", [
    ([(1, 6, 0), (2, 4, 5), (4, 0, 0), (0x10, 4, 0), (0x20, 0, 0)], 5, {9}, True),    # a named user may read
    ([(1, 6, 0), (2, 4, 5), (4, 0, 0), (0x10, 0, 0), (0x20, 0, 0)], 5, {9}, False),   # ... unless the mask says no
    ([(1, 6, 0), (2, 0, 5), (4, 4, 0), (0x10, 4, 0), (0x20, 4, 0)], 5, {1}, False),   # a named entry wins over groups
    ([(1, 6, 0), (4, 0, 0), (8, 4, 9), (0x10, 4, 0), (0x20, 0, 0)], 5, {9}, True),    # a named group
    ([(1, 6, 0), (4, 0, 0), (8, 0, 9), (0x10, 4, 0), (0x20, 4, 0)], 5, {9}, False),   # a matched group denies "other"
    ([(1, 6, 0), (4, 0, 0), (8, 4, 9), (0x10, 4, 0), (0x20, 0, 0)], 5, {3}, False),   # no group matches: other
])
def test_posix_acl_table(acl, uid, gids, allowed):
    from sllmd.transport.credentials import may_access
    assert may_access(0o100640, 1, 1, uid, frozenset(gids), 4, acl) is allowed


def test_check_readable_walks_every_component_and_every_file(tmp_path):
    from sllmd.errors import PermissionDeniedError
    from sllmd.transport import Credentials, check_readable
    me = os.stat(tmp_path).st_uid
    stranger = Credentials(uid=me + 4242, gid=me + 4242, groups=frozenset())
    tmp_path = _searchable_tempdir(tmp_path)
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"x")
    for p in (model, model / "sub"):
        p.chmod(0o755)
    for p in (model / "config.json", model / "sub" / "weights.bin"):
        p.chmod(0o644)
    check_readable(model, stranger)                               # everything is world-readable
    check_readable(model / "absent", stranger)                    # missing: the reader reports it
    (model / "sub" / "weights.bin").chmod(0o600)
    with pytest.raises(PermissionDeniedError, match="may not read .*weights.bin"):
        check_readable(model, stranger)
    check_readable(model, Credentials(uid=me, gid=me + 1, groups=frozenset()))   # its owner may
    (model / "sub" / "weights.bin").chmod(0o644)
    (model / "sub").chmod(0o700)
    with pytest.raises(PermissionDeniedError):
        check_readable(model / "sub" / "weights.bin", stranger)   # the file is readable, its directory is not
    (model / "sub").chmod(0o755)
    secret = tmp_path / "secret"
    secret.write_text("s")
    secret.chmod(0o600)
    (model / "link").symlink_to(secret)                           # a link is judged by what it points to
    with pytest.raises(PermissionDeniedError, match="secret"):
        check_readable(model, stranger)
    with pytest.raises(PermissionDeniedError, match="cannot tell which user"):
        check_readable(model, None)


def test_import_checks_the_requesters_credentials(tmp_path):
    """Over the memory transport the server is told who connected: a stranger's import of a file
    only the daemon's user may read is refused before the node sees it."""
    from sllmd.errors import PermissionDeniedError
    from sllmd.transport import Credentials
    tmp_path = _searchable_tempdir(tmp_path)
    secret = tmp_path / "secret.gguf"
    secret.write_bytes(b"x")
    secret.chmod(0o600)
    me = os.stat(secret).st_uid
    net = MemoryTransport()
    node = ScriptedNode()
    imported = []
    node.import_model = lambda name, source, **kw: imported.append(source) or {"name": name}
    server = Server(node, net.bind("mem://d", max_frame_bytes=MAX_FRAME), max_frame_bytes=MAX_FRAME, heartbeat_s=0.2)
    server.start()
    try:
        stranger = Credentials(uid=me + 4242, gid=me + 4242, groups=frozenset())
        with Client("mem://d", transport=_ConnectAs(net, stranger)) as c:
            with pytest.raises(PermissionDeniedError, match="may not read"):
                c.import_model("m", secret)
            with pytest.raises(PermissionDeniedError):
                c.import_model("m", f"file://{secret}")
        assert imported == []
        with Client("mem://d", transport=net) as c:                # the file's owner may
            c.import_model("m", f"file://{secret}")
        assert imported == [str(secret)]
    finally:
        server.close(timeout=2)


def _searchable_tempdir(tmp_path):
    """pytest's tmp_path sits in a 0700 directory; a fresh one under /tmp that others may search."""
    root = short_tempdir()
    root.chmod(0o711)
    _cleanup.append(root)
    if stat.S_IMODE(os.stat("/tmp").st_mode) & 0o001 == 0:
        pytest.skip("/tmp is not searchable by others")
    return root


_cleanup: list = []


@pytest.fixture(autouse=True)
def _remove_searchable_tempdirs():
    yield
    while _cleanup:
        remove_tree(_cleanup.pop())


class _ConnectAs:
    """A MemoryTransport whose connections present `credentials`."""

    def __init__(self, net, credentials):
        self.net, self.credentials = net, credentials

    def connect(self, address):
        return self.net.connect(address, credentials=self.credentials)

    def close(self):
        pass


def _as_user(uid: int, fn) -> object:
    """Runs fn() in a forked child that became `uid` (no exec: the venv may be unreadable to it);
    returns what it returned, or raises what it raised, as a string."""
    import pickle
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                out = ("ok", fn())
            except BaseException as e:   # noqa: BLE001 - reported to the parent
                out = ("raised", f"{type(e).__name__}: {getattr(e, 'code', '')}: {e}")
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: files of another owner and a client of another uid")
def test_a_real_sllmd_reads_an_import_only_if_the_requesting_user_may():
    nobody = 65534
    root = short_tempdir()
    try:
        root.chmod(0o711)
        with DaemonProcess(root) as daemon:
            os.chmod(daemon.socket, 0o666)                  # let the other uid connect (sllmd itself refuses o+rw)
            src = root / "src"
            src.mkdir(mode=0o755)
            src.chmod(0o755)
            secret = src / "secret.gguf"
            secret.write_bytes(b"GGUF not really")
            os.chown(secret, 4242, 4242)
            secret.chmod(0o600)                             # only uid 4242 (and the root daemon) may read it
            public = src / "public.gguf"
            public.write_bytes(b"GGUF not really")
            public.chmod(0o644)

            def import_(path):
                def go():
                    with Client(daemon.socket, timeout=60) as c:
                        return c.import_model("m", path)
                return go

            kind, text = _as_user(nobody, import_(str(secret)))
            assert kind == "raised" and "permission_denied" in text and "may not read" in text, text
            kind, text = _as_user(nobody, import_(str(public)))
            assert kind == "raised" and "permission_denied" not in text, text   # readable: converting fails
            with Client(daemon.socket) as c:                # root may; the bytes are not a model
                with pytest.raises(SllmError) as info:
                    c.import_model("m", secret)
                assert info.value.code != "permission_denied"

            # A routing id greeted by root's connection is not a greeting for another user's.
            peer = zmq.Context()
            greeted = make_socket(peer, zmq.DEALER, connect="ipc://" + daemon.socket)
            greeted.setsockopt(zmq.ROUTING_ID, b"same-id")
            greeted.close(linger=0)
            greeted = peer.socket(zmq.DEALER)
            greeted.setsockopt(zmq.ROUTING_ID, b"same-id")
            greeted.connect("ipc://" + daemon.socket)
            greeted.send(encode(Hello(id=1, version=PROTOCOL_VERSION)))
            assert greeted.poll(5000) and decode_reply(greeted.recv()).TYPE == "welcome"
            greeted.close(linger=0)
            peer.term()
            time.sleep(0.3)                                  # the daemon's ROUTER notices the disconnect

            def status_without_hello():
                ctx = zmq.Context()
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.ROUTING_ID, b"same-id")
                s.connect("ipc://" + daemon.socket)
                s.send(encode(Status(id=2)))
                got = decode_reply(s.recv()) if s.poll(5000) else None
                s.close()
                ctx.term()
                return getattr(got, "code", None) or getattr(got, "TYPE", None)
            assert _as_user(nobody, status_without_hello) == ("ok", "handshake_required")
            assert daemon.stop() == 0
    finally:
        remove_tree(root)


# --- read-only requests from a snapshot ---------------------------------------------------------------
class VersionedNode(ScriptedNode):
    """A ScriptedNode with `version` (bumped by the test, as Node bumps it on every state change)
    that counts how often its read methods run and can hold `pin` on an event."""

    def __init__(self):
        super().__init__()
        self.version = 1
        self.reads = 0
        self.pin_gate: threading.Event | None = None
        self.pinning = threading.Event()

    def status(self):
        self.reads += 1
        return {**super().status(), "started_at": time.time() - 5.0}

    def pin(self, name):
        self.pinning.set()
        if self.pin_gate is not None:
            self.pin_gate.wait(10)
        super().pin(name)   # no version bump: the forced retake before the reply must catch it


def test_reads_come_from_a_snapshot_until_the_node_changes(serve):
    s = serve(VersionedNode())
    with s.client() as c:
        first = c.status()
        assert first["uptime_s"] >= 5.0 and first["daemon"]["protocol"] == PROTOCOL_VERSION
        for _ in range(20):
            c.status(), c.models(), c.ps()
        assert s.node.reads == 1                     # one snapshot served them all
        assert c.status()["uptime_s"] > first["uptime_s"]   # uptime is live, not frozen in the snapshot
        s.node.names.add("new")
        assert [m["name"] for m in c.models()] == ["echo"]   # same version: the snapshot stands
        s.node.version += 1
        assert [m["name"] for m in c.models()] == ["echo", "new"]
        assert s.node.reads == 2


def test_nodes_come_from_the_snapshot_too(serve):
    s = serve(VersionedNode())
    reads = []

    def node_rows():   # what the cluster (or the lone node) reports, counted
        reads.append(1)
        return [{"name": "n1", "status": "alive", "self": True, "version": s.node.version}]
    s.server._snapshots.readers["nodes"] = node_rows
    s.server._snapshots.max_age_s = 60.0                 # only a change retakes it here, never its age
    with s.client() as c:
        for _ in range(20):
            assert [n["name"] for n in c.nodes()] == ["n1"]
        assert len(reads) == 1                           # answered on the I/O thread from one snapshot
        s.node.version += 1
        assert c.nodes()[0]["version"] == s.node.version and len(reads) == 2


def test_a_peers_change_is_in_the_next_nodes_read(serve):
    """A pulled peer state or a member's status moves the cluster's serial, not the node's version:
    the snapshot is keyed on both, so `nodes` never answers from before it."""
    import types
    s = serve(VersionedNode())
    cluster = types.SimpleNamespace(serial=0, status="alive")
    cluster.nodes = lambda: [{"name": "peer", "status": cluster.status, "self": False}]
    s.server.cluster = cluster
    s.server._snapshots.readers["nodes"] = lambda: s.server.cluster.nodes()
    s.server._snapshots.max_age_s = 60.0                 # only a change retakes it here, never its age
    with s.client() as c:
        assert c.nodes()[0]["status"] == "alive"
        cluster.status = "failed"
        assert c.nodes()[0]["status"] == "alive"        # nothing said it changed: the snapshot stands
        cluster.serial += 1                              # what Cluster does on a pull or a status change
        assert c.nodes()[0]["status"] == "failed"


def test_the_next_read_sees_a_finished_mutation(serve):
    s = serve(VersionedNode())
    with s.client() as c:
        assert c.models()[0]["pinned"] is False
        c.pin("echo")
        assert c.models()[0]["pinned"] is True


def test_a_read_is_answered_while_every_control_worker_is_busy(serve):
    s = serve(VersionedNode(), control_workers=1)
    with s.client() as c, s.client() as other:
        c.status()                                   # the snapshot exists
        s.node.pin_gate = threading.Event()
        pinning = threading.Thread(target=other.pin, args=("echo",))
        pinning.start()
        try:
            assert s.node.pinning.wait(5)
            assert c.status()["daemon"]["requests_in_flight"] == 1   # the only worker is stuck in pin
            assert [m["name"] for m in c.models()] == ["echo"]
        finally:
            s.node.pin_gate.set()
            pinning.join(10)
        assert c.models()[0]["pinned"] is True


def test_a_read_of_a_failing_node_part_is_an_error_and_the_rest_still_served(serve):
    s = serve(VersionedNode())
    s.node.status_error = RuntimeError("disk on fire")
    with s.client() as c:
        with pytest.raises(InternalError, match="disk on fire"):
            c.status()
        assert [m["name"] for m in c.models()] == ["echo"]
        s.node.status_error = None
        s.node.version += 1
        assert c.status()["tiers"]["ssd"]["models"] == 1


def test_a_real_sllmd_shows_each_finished_mutation_in_the_next_read(smollm2_checkpoint):
    root = short_tempdir()
    try:
        with DaemonProcess(root, "--keep-alive", "-1", device_memory="1GiB") as daemon, \
                Client(daemon.socket, timeout=120) as c:
            assert c.models() == [] and c.ps() == []
            for _ in range(5):
                c.status()                                      # reads served from one snapshot
            c.import_model("smol", smollm2_checkpoint)
            assert [m["name"] for m in c.models()] == ["smol"]
            assert c.status()["models"] == 1
            c.load("smol")
            assert [p["name"] for p in c.ps()] == ["smol"]
            assert [i["name"] for i in c.status()["instances"]] == ["smol"]
            c.pin("smol")
            assert c.models()[0]["pinned"] is True
            c.unpin("smol")
            assert c.models()[0]["pinned"] is False
            c.evict("smol")
            assert c.ps() == []
            c.remove("smol")
            assert c.models() == [] and c.status()["models"] == 0
    finally:
        remove_tree(root)
