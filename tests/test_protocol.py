"""The wire protocol: every message round-trips, every malformed frame is refused with a typed error."""
from __future__ import annotations

import msgpack
import pytest

from sllmd import errors as core_errors
from sllmd.protocol import (PROTOCOL_VERSION, REPLIES, REQUESTS, BadMessageError, BusyError, DaemonUnreachableError,
                            Error, Hello, Infer, InternalError, OversizedError, RemoteError, Token, UnknownTypeError,
                            decode_reply, decode_request, encode, error_reply_fields, exception_from_reply, peek_id)

# One valid instance of every message type, by field values.
SAMPLES = {
    "hello": dict(version=PROTOCOL_VERSION, client="test"),
    "ping": {}, "status": {}, "models": {}, "ps": {}, "cancel": {},
    "metrics": {},
    "requests": dict(all=True), "nodes": {}, "migrate": dict(request_id="3f2a9c", to="b"),
    "import": dict(name="smol", source="/models/smol.gguf"),
    "load": dict(name="smol", keep_alive=300.0),
    "evict": dict(name="smol", tier="dram"),
    "remove": dict(name="smol"), "pin": dict(name="smol"), "unpin": dict(name="smol"), "show": dict(name="smol"),
    "infer": dict(model="smol", prompt="hi", max_tokens=8, temperature=0.7, top_p=0.9, seed=3, stop=["\n"],
                  keep_alive=-1.0, chat=False),
    "welcome": dict(version=PROTOCOL_VERSION, server="0.1.0", max_frame_bytes=1 << 20, heartbeat_s=1.0),
    "result": dict(data={"models": [{"name": "a", "tiers": ["ssd"]}]}),
    "token": dict(text="Par", token_id=42, index=0),
    "progress": dict(done=5, total=10),
    "event": dict(event="loading", data={"tier": "ssd"}),
    "done": dict(stats={"tokens": 3, "ttft_s": 0.1}),
    "heartbeat": {},
    "watch": dict(interval_s=0.25, cluster=True, max_events=64), "ack": dict(seq=3),
    "update": dict(data={"seq": 3, "time": 1.0, "dropped": 0, "snapshot": {}, "events": []}),
    "error": dict(code="busy", message="full", exit_code=75),
}


def test_every_declared_message_has_a_sample():
    assert set(SAMPLES) == set(REQUESTS) | set(REPLIES)
    assert not set(REQUESTS) & set(REPLIES)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_round_trip(kind):
    cls = REQUESTS.get(kind) or REPLIES[kind]
    msg = cls(id=7, **SAMPLES[kind])
    frame = encode(msg)
    wire = msgpack.unpackb(frame)
    assert list(wire)[:2] == ["type", "id"]      # the first field names the type
    assert wire["type"] == kind
    decode = decode_request if kind in REQUESTS else decode_reply
    assert decode(frame) == msg


def test_none_optionals_are_left_off_the_wire_and_come_back():
    msg = Infer(id=1, model="m", prompt="p")
    wire = msgpack.unpackb(encode(msg))
    assert set(wire) == {"type", "id", "model", "prompt", "chat"}
    assert decode_request(encode(msg)) == msg


def test_int_is_widened_to_float_but_bool_is_not_an_int():
    assert decode_request(msgpack.packb({"type": "load", "id": 1, "name": "m", "keep_alive": 5})).keep_alive == 5.0
    with pytest.raises(BadMessageError, match="id"):
        decode_request(msgpack.packb({"type": "ping", "id": True}))
    with pytest.raises(BadMessageError, match="max_tokens"):
        decode_request(msgpack.packb({"type": "infer", "id": 1, "model": "m", "prompt": "p", "max_tokens": 1.5}))


def frame(**fields):
    return msgpack.packb(fields)


@pytest.mark.parametrize("raw, code, request_id", [
    (b"\xc1garbage", "bad_message", None),                                          # never-used msgpack byte
    (b"", "bad_message", None),
    (b"\x00\x01\x02", "bad_message", None),                                         # extra data
    (frame(type="infer", id=5, model="m", prompt="x" * 100)[:-10], "bad_message", 5),  # truncated
    (msgpack.packb([1, 2, 3]), "bad_message", None),                                # not a map
    (msgpack.packb({1: 2}), "bad_message", None),                                    # non-string key
    (frame(id=3), "bad_message", 3),                                                 # no type
    (frame(type=3, id=3), "bad_message", 3),
    (frame(type="nope", id=4), "unknown_type", 4),
    (frame(type="welcome", id=4, version=1, server="x", max_frame_bytes=1, heartbeat_s=1.0), "unknown_type", 4),
    (frame(type="load", id=6), "bad_message", 6),                                    # missing field
    (frame(type="load", id=6, name="m", extra=1), "bad_message", 6),                 # unknown field
    (frame(type="load", id=6, name=3), "bad_message", 6),                            # wrong type
    (frame(type="load", id=6, name="../etc"), "bad_message", 6),                     # not a model name
    (frame(type="evict", id=6, name="m", tier="floppy"), "bad_message", 6),          # not a tier
    (frame(type="infer", id=8, model="m"), "bad_message", 8),                        # neither prompt nor messages
    (frame(type="infer", id=8, model="m", prompt="a", messages=[{"role": "user", "content": "b"}]),
     "bad_message", 8),
    (frame(type="infer", id=8, model="m", messages=[{"role": "user"}]), "bad_message", 8),
    (frame(type="infer", id=8, model="m", prompt="a", top_p=0.0), "bad_message", 8),
    (frame(type="infer", id=8, model="m", prompt="a", temperature=-1), "bad_message", 8),
    (frame(type="infer", id=8, model="m", prompt="a", stop="x"), "bad_message", 8),
    (frame(type="ping", id=-1), "bad_message", None),
    (frame(type="ping", id=2**64 - 1), "bad_message", None),
    (msgpack.packb({"type": "ping", "id": 1, "x": msgpack.ExtType(5, b"zz")}), "bad_message", 1),
])
def test_malformed_frames_are_refused_with_a_code_and_the_id_when_readable(raw, code, request_id):
    with pytest.raises(BadMessageError) as info:
        decode_request(raw)
    assert info.value.code == code
    assert info.value.request_id == request_id
    assert str(info.value)


def test_deep_nesting_is_refused():
    nested: object = "x"
    for _ in range(40):
        nested = [nested]
    with pytest.raises(BadMessageError, match="nests|msgpack"):
        decode_request(frame(type="result", id=1, data=nested))
    with pytest.raises(BadMessageError):
        decode_reply(frame(type="result", id=1, data=nested))


def test_oversized_frames_are_refused_before_parsing_and_keep_their_id():
    big = encode(Infer(id=99, model="m", prompt="x" * 5000))
    with pytest.raises(OversizedError) as info:
        decode_request(big, max_bytes=1000)
    assert info.value.code == "oversized" and info.value.request_id == 99
    assert decode_request(big, max_bytes=len(big)).id == 99


def test_peek_id_reads_only_the_head():
    assert peek_id(encode(Token(id=12, text="x"))) == 12
    assert peek_id(b"\xc1") is None
    assert peek_id(frame(type="ping", id="x")) is None


def test_local_construction_is_validated_too():
    with pytest.raises(BadMessageError, match="model"):
        Infer(id=1, model="", prompt="p")
    with pytest.raises(BadMessageError, match="version"):
        Hello(id=1, version="1")


def _all_error_classes(base=core_errors.SllmError):
    for sub in base.__subclasses__():
        yield sub
        yield from _all_error_classes(sub)


def test_every_error_class_has_its_own_registered_code():
    # import every module that raises, so that any class declared outside sllmd.errors is seen too
    import pkgutil, importlib, sllmd
    for mod in pkgutil.walk_packages(sllmd.__path__, "sllmd."):
        if not mod.name.startswith("sllmd._native"):
            importlib.import_module(mod.name)
    classes = [c for c in _all_error_classes() if c is not RemoteError]
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes)), "two classes share a code"
    assert all(c.__module__ == "sllmd.errors" for c in classes), "errors are declared in sllmd.errors only"
    assert set(codes) | {"error"} <= set(core_errors.CODES)
    assert len(set(core_errors.CODES.values())) == len(core_errors.CODES), "code numbers are unique"
    assert all(core_errors.REGISTRY[c.code] is c for c in classes)
    with pytest.raises(TypeError, match="taken"):
        type("Again", (core_errors.SllmError,), {"code": "busy"})
    with pytest.raises(TypeError, match="not in"):
        type("Unlisted", (core_errors.SllmError,), {"code": "no_such_code"})


def test_exit_codes_are_the_documented_ones():
    assert BusyError.exit_code == 75 and core_errors.DaemonTimeoutError.exit_code == 75
    assert DaemonUnreachableError.exit_code == 69
    assert core_errors.InvalidArgumentError.exit_code == 2
    assert core_errors.ConfigError.exit_code == 78
    assert core_errors.TooLargeError.exit_code == 1 and core_errors.OutOfMemoryError.exit_code == 75


def test_error_replies_become_the_same_exception():
    for exc in (BusyError("queue full"), core_errors.CorruptCheckpointError("bad block at 4096"),
                UnknownTypeError("what")):
        fields = error_reply_fields(exc)
        back = exception_from_reply(**fields)
        assert type(back) is type(exc) and str(back) == str(exc) and back.exit_code == exc.exit_code


def test_error_classes_declared_by_the_core_are_found():
    back = exception_from_reply("model_not_found", "no model named 'x'", 1)
    assert back.code == "model_not_found" and type(back).__name__ == "ModelNotFoundError"


def test_unknown_codes_and_plain_exceptions():
    back = exception_from_reply("from_the_future", "new failure", 75)
    assert isinstance(back, RemoteError) and back.code == "from_the_future" and back.exit_code == 75
    fields = error_reply_fields(ValueError("boom"))
    assert fields["code"] == InternalError.code and "boom" in fields["message"]
    err = Error(id=None, **fields)
    assert decode_reply(encode(err)) == err


def test_a_prepacked_result_is_byte_for_byte_an_encoded_result():
    from sllmd.protocol import Result
    from sllmd.protocol.codec import encode_packed_result, pack
    from sllmd.snapshot import map_header
    for data in ([], {"a": [1, 2.5, {"b": None}]}, "x" * 100):   # (None data is left out of a result)
        assert encode_packed_result(7, pack(data)) == encode(Result(id=7, data=data))
    for n in (0, 15, 16, 70_000):
        items = {f"k{i}": i for i in range(n)}
        body = map_header(n) + b"".join(pack(k) + pack(v) for k, v in items.items())
        assert msgpack.unpackb(body) == items


def test_the_infer_message_is_the_engines_request_on_the_wire():
    """Infer's values are checked once, by InferRequest: on arrival with the engine's words."""
    import dataclasses

    from sllmd.inference.request import InferRequest, SamplingParams
    msg = Infer(id=1, model="m", prompt="p", max_tokens=5, temperature=0.5, top_p=0.9, seed=3, stop=["x"],
                keep_alive=0.0, chat=False)
    req = msg.to_request()
    assert req.sampling == SamplingParams(temperature=0.5, top_p=0.9, seed=3, max_tokens=5, stop=("x",))
    assert (req.model, req.prompt, req.messages, req.raw, req.keep_alive) == ("m", "p", None, True, 0.0)
    assert Infer(id=1, model="m", prompt="p").to_request().sampling == SamplingParams()   # the engine's defaults
    engine = ({f.name for f in dataclasses.fields(InferRequest)} - {"sampling", "raw", "request_id"}
              | {f.name for f in dataclasses.fields(SamplingParams)})
    assert engine <= {f.name for f in dataclasses.fields(Infer)}, "an engine field the wire cannot set"
    for bad, words in ((dict(max_tokens=0), "max_tokens must be"), (dict(stop=[""]), "stop must be"),
                       (dict(top_p=0.0), "top_p must be"), (dict(seed=-1), "seed must be")):
        with pytest.raises(BadMessageError, match=words):
            decode_request(frame(type="infer", id=1, model="m", prompt="p", **bad))
