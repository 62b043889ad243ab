"""The peer socket in one process: real CurveZMQ sockets, the real ZAP handler and PeerServer.

The node behind the server is a small stand-in that streams numbered tokens (the product
here is the peer socket; tests/test_cluster.py runs it between real sllmd nodes)."""
from __future__ import annotations

import os
import threading
import time

import msgpack
import pytest
import zmq

from sllmd.cluster import curve_keys
from sllmd.cluster.peer_messages import PeerInfer, StatePull, decode_peer_request
from sllmd.cluster.peer_server import PeerClient, PeerServer
from sllmd.cluster.peer_transport import advertised_endpoint, bind_peer
from sllmd.cluster.state_delta import StateHistory, apply_delta, diff
from sllmd.errors import BusyError, ConfigError, DaemonTimeoutError, UnknownTypeError
from sllmd.protocol import decode_request, encode
from sllmd.protocol.messages import Status


class StreamingNode:
    """Streams `n` tokens per request, one every `delay` s; records cancels."""

    version = 7

    def __init__(self, n: int = 5, delay: float = 0.0):
        self.n, self.delay = n, delay
        self.cancelled: list[str] = []
        self.busy = False

    def infer(self, request, cancelled=None):
        def events():
            if self.busy:
                raise BusyError("model 'm' is busy")
            try:
                for i in range(self.n):
                    if cancelled is not None and cancelled.is_set():
                        self.cancelled.append(request.request_id)
                        return
                    time.sleep(self.delay)
                    yield {"type": "token", "text": f"t{i} ", "token_id": i}
                yield {"type": "done", "stats": {"tokens": self.n}}
            except GeneratorExit:
                self.cancelled.append(request.request_id)
                raise
        return events()


@pytest.fixture
def keys():
    return {name: zmq.curve_keypair() for name in ("server", "member", "stranger")}


@pytest.fixture
def served(keys):
    node = StreamingNode()
    members = {keys["member"][0]}
    state = {"node": "B", "models": [{"name": "m", "tiers": ["ssd"]}], "taken_at": 0}
    endpoint = bind_peer("tcp://127.0.0.1:0", *keys["server"], admitted=lambda k: k in members)
    server = PeerServer(node, endpoint, state_provider=lambda: (node.version, dict(state)), heartbeat_s=0.2)
    server.start()
    yield {"node": node, "server": server, "address": endpoint.address, "state": state, "members": members}
    server.close()


def _client(served, keys, who="member", timeout=10.0) -> PeerClient:
    return PeerClient(served["address"], keys["server"][0], *keys[who], node_name=who, timeout=timeout)


def test_a_member_pulls_the_state_and_then_deltas(served, keys):
    c = _client(served, keys)
    try:
        version, state = c.state()
        assert version == 7 and state["models"] == [{"name": "m", "tiers": ["ssd"]}]
        served["state"]["models"] = [{"name": "m", "tiers": ["ssd", "dram"]}, {"name": "n", "tiers": ["ssd"]}]
        version, state = c.state()   # a delta on the wire, the whole state here
        assert state["models"] == [{"name": "m", "tiers": ["ssd", "dram"]}, {"name": "n", "tiers": ["ssd"]}]
    finally:
        c.close()


def test_a_stream_carries_numbered_tokens_and_done(served, keys):
    c = _client(served, keys)
    try:
        events = list(c.infer({"model": "m", "prompt": "hi", "request_id": "r1"}))
        tokens = [e for e in events if e["type"] == "token"]
        assert [t["index"] for t in tokens] == [0, 1, 2, 3, 4]
        assert events[-1] == {"type": "done", "stats": {"tokens": 5}}
    finally:
        c.close()


def test_closing_a_stream_cancels_the_request_on_the_peer(served, keys):
    served["node"].n, served["node"].delay = 1000, 0.01
    c = _client(served, keys)
    try:
        stream = c.infer({"model": "m", "prompt": "hi", "request_id": "r-cancel"})
        assert next(stream)["type"] == "token"
        stream.close()
        deadline = time.monotonic() + 10
        while "r-cancel" not in served["node"].cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "r-cancel" in served["node"].cancelled
        assert c.state()[0] == 7   # the pooled connection still works
    finally:
        c.close()


def test_a_busy_peer_refuses_before_any_token(served, keys):
    served["node"].busy = True
    c = _client(served, keys)
    try:
        with pytest.raises(BusyError):
            next(c.infer({"model": "m", "prompt": "hi"}))
    finally:
        c.close()


def test_an_unknown_key_gets_nothing_and_members_are_served_on(served, keys):
    stranger = _client(served, keys, "stranger", timeout=1.5)
    try:
        with pytest.raises(DaemonTimeoutError):
            stranger.state()
    finally:
        stranger.close()
    member = _client(served, keys)
    try:
        assert member.state()[0] == 7
    finally:
        member.close()


def test_admission_follows_membership(served, keys):
    served["members"].add(keys["stranger"][0])     # it joined
    c = _client(served, keys, "stranger")
    try:
        assert c.state()[0] == 7
    finally:
        c.close()


def test_a_plain_zeromq_client_gets_nothing(served):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(served["address"])
        sock.send(msgpack.packb({"type": "peer_hello", "id": 1, "version": 1}))
        assert not sock.poll(1500, zmq.POLLIN)
    finally:
        sock.close()
        ctx.term()
    assert served["server"].serving


def _raw_member_socket(served, keys):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys["server"][0])
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys["member"][0])
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys["member"][1])
    sock.connect(served["address"])
    return ctx, sock


def test_malformed_frames_and_client_messages_from_a_member_get_errors(served, keys):
    ctx, sock = _raw_member_socket(served, keys)
    try:
        def ask(frame: bytes) -> dict:
            sock.send(frame)
            assert sock.poll(5000, zmq.POLLIN), "no answer"
            return msgpack.unpackb(sock.recv())
        assert ask(b"\xc1garbage")["code"] == "bad_message"
        assert ask(msgpack.packb([1, 2, 3]))["code"] == "bad_message"
        hello = ask(msgpack.packb({"type": "peer_hello", "id": 1, "version": 1, "node": "raw"}))
        assert hello["type"] == "welcome"
        refused = ask(encode(Status(id=2)))                   # a client message on the peer socket
        assert refused["type"] == "error" and refused["code"] == "unknown_type" and refused["id"] == 2
        bad = ask(msgpack.packb({"type": "state_pull", "id": 3, "since": -1}))
        assert bad["code"] == "bad_message" and bad["id"] == 3
        assert ask(msgpack.packb({"type": "state_pull", "id": 4}))["type"] == "result"
    finally:
        sock.close()
        ctx.term()
    assert served["server"].serving


def test_a_peer_message_is_unknown_on_the_client_socket():
    frame = encode(PeerInfer(id=1, model="m", prompt="hi"))
    with pytest.raises(UnknownTypeError):
        decode_request(frame)
    with pytest.raises(UnknownTypeError, match="not accepted"):
        decode_peer_request(encode(Status(id=1)))
    assert decode_peer_request(encode(StatePull(id=1, since=3))).since == 3


def test_the_key_pair_is_made_once_and_kept_private(tmp_path):
    state = tmp_path / "state"
    public, secret = curve_keys.load_or_create(state)
    assert (public, secret) == curve_keys.load_or_create(state)
    assert zmq.curve_public(secret) == public
    assert os.stat(state).st_mode & 0o777 == 0o700
    assert os.stat(state / curve_keys.SECRET_FILE).st_mode & 0o777 == 0o600
    assert (state / curve_keys.PUBLIC_FILE).read_text().strip() == public.decode()


def test_a_secret_key_readable_by_others_or_damaged_is_refused(tmp_path):
    state = tmp_path / "state"
    curve_keys.load_or_create(state)
    secret_file = state / curve_keys.SECRET_FILE
    os.chmod(secret_file, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        curve_keys.load_or_create(state)
    os.chmod(secret_file, 0o600)
    secret_file.write_text("not a key\n")
    with pytest.raises(ConfigError, match="z85"):
        curve_keys.load_or_create(state)


def test_the_gossiped_endpoint_is_never_a_wildcard():
    assert advertised_endpoint("tcp://127.0.0.1:7000") == "tcp://127.0.0.1:7000"
    assert advertised_endpoint("tcp://0.0.0.0:7000", "10.1.2.3:7946") == "tcp://10.1.2.3:7000"
    assert not advertised_endpoint("tcp://0.0.0.0:7000", "0.0.0.0:7946").startswith("tcp://0.0.0.0")


def test_binding_a_busy_port_is_a_clear_error(keys, served):
    from sllmd.errors import AddressInUseError
    with pytest.raises(AddressInUseError):
        bind_peer(served["address"], *keys["server"], admitted=lambda k: True)


@pytest.mark.parametrize("old,new", [
    ({}, {"a": 1}),
    ({"a": 1, "b": 2}, {"a": 1}),
    ({"models": [{"name": "x", "t": 1}]}, {"models": [{"name": "x", "t": 2}, {"name": "y", "t": 0}]}),
    ({"models": [{"name": "x"}, {"name": "y"}]}, {"models": [{"name": "y"}]}),
    ({"models": [{"name": "x"}, {"name": "y"}]}, {"models": [{"name": "y"}, {"name": "x"}]}),   # order kept
    ({"models": [1, 2]}, {"models": [{"name": "x"}]}),                                        # not keyed: whole
    ({"instances": [], "v": 1}, {"instances": [{"name": "x", "active_requests": 1}], "v": 2}),
])
def test_a_delta_rebuilds_the_new_state(old, new):
    assert apply_delta(old, diff(old, new)) == new


def test_a_delta_sends_only_what_changed():
    old = {"models": [{"name": f"m{i}", "tiers": ["ssd"]} for i in range(100)], "version": 1}
    new = {"models": [dict(m) for m in old["models"]], "version": 2}
    new["models"][5] = {"name": "m5", "tiers": ["ssd", "dram"]}
    d = diff(old, new)
    assert d["set"] == {"version": 2} and d["items"]["models"]["upsert"] == [new["models"][5]]


def test_history_answers_with_a_delta_only_from_an_answer_it_remembers():
    h = StateHistory(keep=2)
    first = h.answer(1, {"a": 1}, since=0)
    assert first["state"] == {"a": 1}
    second = h.answer(2, {"a": 2}, since=first["serial"])
    assert apply_delta({"a": 1}, second["delta"]) == {"a": 2}
    h.answer(3, {"a": 3}, since=0)
    h.answer(4, {"a": 4}, since=0)
    assert "state" in h.answer(5, {"a": 5}, since=first["serial"])   # forgotten: the whole state


@pytest.mark.parametrize("delta", [[1], {"set": []}, {"items": {"models": {"upsert": [{"no": "name"}]}}},
                                   {"items": {"models": {"order": ["ghost"]}}}])
def test_a_malformed_delta_is_refused(delta):
    with pytest.raises(ValueError):
        apply_delta({"models": []}, delta)


def test_a_closed_client_never_blocks_on_a_stream_in_use(served, keys):
    served["node"].n, served["node"].delay = 1000, 0.01
    c = _client(served, keys)
    stream = c.infer({"model": "m", "prompt": "hi"})
    assert next(stream)["type"] == "token"
    closer = threading.Thread(target=c.close)
    closer.start()
    closer.join(5)
    assert not closer.is_alive()
    stream.close()   # the last connection in use: the client's context ends now
