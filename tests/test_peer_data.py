"""peer_fetch (sllmd.cluster.peer_data): a checkpoint's bytes as a ZeroMQ frame of their own,
over real CurveZMQ sockets to a real PeerServer reading a real checkpoint. A peer whose data
frames are malformed is refused clearly (never a silent wait), and a download from it fails
naming it; the rest of the node's peer calls go on."""
from __future__ import annotations

import types

import pytest
import zmq

from sllmd.cluster.peer_data import fetch
from sllmd.cluster.peer_server import PeerClient, PeerServer
from sllmd.cluster.peer_transport import MAX_REPLY_BYTES, bind_peer
from sllmd.errors import BadMessageError, DaemonTimeoutError, RepositoryError
from sllmd.protocol import Result, encode
from sllmd.repository.download import Download
from sllmd.repository.peer import PeerRemote


class _Ssd:
    def __init__(self, path):
        self.root, self._path = path.parent, path

    def acquire(self, model):
        return types.SimpleNamespace(path=self._path, imported_at=1.0)

    def release(self, model):
        pass


class _BadServer(PeerServer):
    """Answers peer_fetch (and state_pull) with the frames named by `self.bad`."""

    bad = "short"

    def _peer_fetch(self, msg, call):
        head = encode(Result(id=msg.id, data={"length": msg.length}))
        if self.bad == "short":      # the header promises more than the frame holds
            return head, b"x" * (msg.length // 2)
        if self.bad == "no-length":
            return encode(Result(id=msg.id, data={"size": 4})), b"abcd"
        if self.bad == "three":
            return head, b"a", b"b"
        if self.bad == "inline":     # peer_read's shape: no data frame
            return Result(id=msg.id, data={"data": b"abcd"})
        if self.bad == "more":       # more than was asked for
            return encode(Result(id=msg.id, data={"length": msg.length + 1})), b"y" * (msg.length + 1)
        if self.bad == "huge":       # over what our socket accepts from a peer
            return head, bytes(MAX_REPLY_BYTES + 1)
        raise AssertionError(self.bad)

    def _state_pull(self, msg, call):
        return encode(Result(id=msg.id, data={"length": 4})), b"abcd"


@pytest.fixture
def peer(tiny_servable_checkpoint):
    skeys, ckeys = zmq.curve_keypair(), zmq.curve_keypair()
    servers = []

    def start(cls=PeerServer):
        endpoint = bind_peer("tcp://127.0.0.1:0", *skeys, admitted=lambda k: k == ckeys[0])
        server = cls(types.SimpleNamespace(ssd=_Ssd(tiny_servable_checkpoint)), endpoint,
                     state_provider=lambda: (1, {}), heartbeat_s=0.2)
        server.start()
        client = PeerClient(endpoint.address, skeys[0], *ckeys, node_name="b", timeout=2.0)
        servers.append((server, client))
        return server, client

    yield start
    for server, client in servers:
        client.close()
        server.close()


def _data_file(ckpt):
    return max((p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_fetch_returns_the_bytes_uncopied_and_a_download_verifies_them(peer, tiny_servable_checkpoint, tmp_path):
    _, client = peer()
    data = _data_file(tiny_servable_checkpoint)
    rel = data.relative_to(tiny_servable_checkpoint).as_posix()
    raw = data.read_bytes()
    got = fetch(client, "tiny", rel, 3, 1000)
    assert isinstance(got, memoryview) and bytes(got) == raw[3:1003]
    assert bytes(fetch(client, "tiny", rel, len(raw) - 10, 1000)) == raw[-10:]   # a short read at the end
    with pytest.raises(RepositoryError, match="no file"):
        fetch(client, "tiny", "../../etc/passwd", 0, 10)
    remote = PeerRemote(client, "a", "tiny", chunk=64 << 10)
    out = Download(remote, remote.entry(), tmp_path / "dl", connections=3).run()
    for f in tiny_servable_checkpoint.rglob("*"):
        if f.is_file():
            assert (out / f.relative_to(tiny_servable_checkpoint)).read_bytes() == f.read_bytes()


@pytest.mark.parametrize("bad", ["short", "no-length", "three", "inline", "more"])
def test_a_malformed_data_frame_is_refused_at_once_and_the_download_fails_naming_the_peer(peer, bad, tmp_path,
                                                                                          tiny_servable_checkpoint):
    server, client = peer(_BadServer)
    server.bad = bad
    data = _data_file(tiny_servable_checkpoint)
    rel = data.relative_to(tiny_servable_checkpoint).as_posix()
    with pytest.raises(BadMessageError, match="peer_fetch reply"):
        fetch(client, "tiny", rel, 0, 4096)
    remote = PeerRemote(client, "a", "tiny", chunk=4096)
    with pytest.raises(RepositoryError, match=r"peer://a/tiny: .*peer_fetch reply"):
        Download(remote, remote.entry(), tmp_path / "dl", connections=2).run()


def test_a_data_frame_nobody_asked_for_is_refused(peer):
    _, client = peer(_BadServer)
    with pytest.raises(BadMessageError, match="asked for none"):
        client.state()


def test_a_reply_over_the_size_limit_never_reaches_us_and_the_call_times_out(peer, tiny_servable_checkpoint):
    server, client = peer(_BadServer)
    server.bad = "huge"
    data = _data_file(tiny_servable_checkpoint)
    with pytest.raises(DaemonTimeoutError):
        fetch(client, "tiny", data.relative_to(tiny_servable_checkpoint).as_posix(), 0, 4096)
    server.bad = "short"
    with pytest.raises(BadMessageError):   # the next call goes on, on a fresh connection
        fetch(client, "tiny", data.relative_to(tiny_servable_checkpoint).as_posix(), 0, 4096)
