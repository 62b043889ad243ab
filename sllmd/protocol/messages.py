"""Every message of the sllmd protocol, declared once (DESIGN.md section 6).

On the wire a message is one msgpack map in one ZeroMQ frame. Its first key,
"type", names the message; its second, "id", is the request id that the
client chose and that every reply to that request repeats (ids let one
connection carry several requests at once, e.g. a status poll during a
stream). Type names are append-only: never rename or reuse one.

A conversation:

    hello -> welcome                    (first, on every connection; carries PROTOCOL_VERSION)
    status | models | ps | show | load | evict | remove | pin | unpin | ping -> result | error
    metrics -> result                   (data: the Prometheus text exposition, a str)
    import -> (progress | event)* -> result | error     (events: "phase", "evicted")
    infer  -> (token | event)* -> done | error
    watch  -> update* -> error          (until cancelled; the client acks each update it has taken)
    cancel                              (no reply of its own: the cancelled request ends with an error)

While a request is in flight the daemon sends `heartbeat` for it whenever it
has sent nothing else for `heartbeat_s` (given in `welcome`). The client
takes silence as a dead daemon; the daemon takes a heartbeat that cannot be
delivered as a client that went away, and cancels its requests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sllmd.errors import BadMessageError, InvalidRequestError
from sllmd.inference.request import InferRequest, SamplingParams
from .schema import Message, at_least, checked, in_range, max_len, model_name, non_empty

PROTOCOL_VERSION = 1
MAX_ID = 2**63 - 1

REQUESTS: dict[str, type[Message]] = {}
REPLIES: dict[str, type[Message]] = {}


def _declare(registry: dict[str, type[Message]], name: str):
    def register(cls):
        if name in REQUESTS or name in REPLIES:
            raise TypeError(f"message type {name!r} declared twice")
        cls.TYPE = name
        registry[name] = cls
        return cls
    return register


def request(name: str):
    """Declares a client -> daemon message."""
    return _declare(REQUESTS, name)


def reply(name: str):
    """Declares a daemon -> client message."""
    return _declare(REPLIES, name)


@dataclass(frozen=True, kw_only=True)
class Envelope(Message):
    id: int = checked(in_range(0, MAX_ID))


# --- requests -------------------------------------------------------------------------------
@request("hello")
@dataclass(frozen=True, kw_only=True)
class Hello(Envelope):
    version: int
    client: str = checked(max_len(200), default="")


@request("ping")
@dataclass(frozen=True, kw_only=True)
class Ping(Envelope):
    pass


@request("status")
@dataclass(frozen=True, kw_only=True)
class Status(Envelope):
    pass


@request("models")
@dataclass(frozen=True, kw_only=True)
class Models(Envelope):
    all: bool = False           # every cluster node's models, each with its "node"


@request("ps")
@dataclass(frozen=True, kw_only=True)
class Ps(Envelope):
    all: bool = False           # every cluster node's instances, each with its "node"


@request("requests")
@dataclass(frozen=True, kw_only=True)
class Requests(Envelope):
    """Running and queued requests (id, model, tokens in/out, state, age)."""

    all: bool = False           # every cluster node's, each with its "node"


@request("nodes")
@dataclass(frozen=True, kw_only=True)
class Nodes(Envelope):
    """The cluster's members (a node without a cluster lists itself)."""


@request("import")
@dataclass(frozen=True, kw_only=True)
class Import(Envelope):
    name: str = checked(model_name)
    source: str = checked(non_empty, max_len(4096))
    no_tokenizer: bool = False  # accept a model without a tokenizer (else refused at import)


@request("load")
@dataclass(frozen=True, kw_only=True)
class Load(Envelope):
    name: str = checked(model_name)
    keep_alive: float | None = None     # seconds; negative = forever, 0 = unload when idle


@request("evict")
@dataclass(frozen=True, kw_only=True)
class Evict(Envelope):
    name: str = checked(model_name)
    tier: Literal["device", "dram", "ssd"] = "device"
    force: bool = False                 # tier ssd: remove the model even if it is pinned


@request("remove")
@dataclass(frozen=True, kw_only=True)
class Remove(Envelope):
    name: str = checked(model_name)
    force: bool = False                 # remove the model even if it is pinned


@request("pin")
@dataclass(frozen=True, kw_only=True)
class Pin(Envelope):
    name: str = checked(model_name)


@request("unpin")
@dataclass(frozen=True, kw_only=True)
class Unpin(Envelope):
    name: str = checked(model_name)


@dataclass(frozen=True, kw_only=True)
class InferFields(Envelope):
    """An InferRequest's fields as they travel, None = the engine's default: the client's
    `infer` and the peer protocol's `peer_infer` both carry them."""

    model: str = checked(model_name)
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    keep_alive: float | None = None


@request("infer")
@dataclass(frozen=True, kw_only=True)
class Infer(InferFields):
    """The wire form of an InferRequest: its fields flattened, None = the engine's default.
    Values are checked once, by InferRequest.validate (on arrival here, and in the engine)."""

    chat: bool = True               # False: the prompt is raw text, no chat template (InferRequest.raw)
    node: str | None = None         # run on this cluster node (sllmctl infer --node); None: placement picks

    def check(self) -> None:
        try:
            self.to_request()
        except InvalidRequestError as e:
            raise BadMessageError(f"infer: {e}") from None

    def to_request(self) -> InferRequest:
        """The engine's request, validated (InvalidRequestError)."""
        given = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                 "max_tokens": self.max_tokens, "stop": None if self.stop is None else tuple(self.stop)}
        sampling = SamplingParams(**{k: v for k, v in given.items() if v is not None})
        return InferRequest(model=self.model, prompt=self.prompt, messages=self.messages, raw=not self.chat,
                            sampling=sampling, keep_alive=self.keep_alive).validate()


@request("migrate")
@dataclass(frozen=True, kw_only=True)
class Migrate(Envelope):
    """Moves a running request to another cluster node (live migration, DESIGN.md section 9)."""

    request_id: str = checked(non_empty, max_len(128))
    to: str = checked(non_empty, max_len(200))


@request("show")
@dataclass(frozen=True, kw_only=True)
class Show(Envelope):
    """A model's description (architecture, parameters, context length, dtype, chat template, sizes)."""

    name: str = checked(model_name)


@request("metrics")
@dataclass(frozen=True, kw_only=True)
class MetricsRequest(Envelope):
    """The node's Prometheus metrics, as text (what GET /metrics serves with --http)."""


@request("cancel")
@dataclass(frozen=True, kw_only=True)
class Cancel(Envelope):
    """Cancels the in-flight request with this id on this connection."""


@dataclass(frozen=True, kw_only=True)
class WatchFields(Envelope):
    """A watch's fields as they travel: the client's `watch` and the peer protocol's `peer_watch`."""

    interval_s: float = checked(in_range(0.05, 10.0), default=0.5)
    max_events: int = checked(in_range(1, 100_000), default=1000)   # events held for this watcher


@request("watch")
@dataclass(frozen=True, kw_only=True)
class Watch(WatchFields):
    """A stream of `update`s (snapshot + events, sllmd.watch) at most every interval_s, until cancelled.
    Flow control: the daemon keeps a few updates unacknowledged at most (`ack`); meanwhile it
    coalesces events, and the next update counts what it dropped."""

    cluster: bool = False       # also the other cluster nodes' view (nodes, their models/instances/requests)


@request("ack")
@dataclass(frozen=True, kw_only=True)
class Ack(Envelope):
    """The client has taken the replies of flow-controlled stream `id` (watch) up to `seq`. No reply."""

    seq: int = checked(in_range(0, MAX_ID))


# --- replies --------------------------------------------------------------------------------
@reply("welcome")
@dataclass(frozen=True, kw_only=True)
class Welcome(Envelope):
    version: int
    server: str                 # daemon software version
    max_frame_bytes: int = checked(at_least(1))
    heartbeat_s: float = checked(in_range(0.01, 3600.0))


@reply("result")
@dataclass(frozen=True, kw_only=True)
class Result(Envelope):
    data: Any = None


@reply("token")
@dataclass(frozen=True, kw_only=True)
class Token(Envelope):
    text: str
    token_id: int | None = None
    index: int | None = checked(at_least(0), default=None)   # 0-based position in the answer: a relay
                                                             # (or a migration) drops a duplicate by it


@reply("progress")
@dataclass(frozen=True, kw_only=True)
class Progress(Envelope):
    done: int = checked(at_least(0))
    total: int = checked(at_least(0))


@reply("event")
@dataclass(frozen=True, kw_only=True)
class Event(Envelope):
    """A stream event other than a token (e.g. a state change); `event` names it."""

    event: str = checked(non_empty)
    data: dict[str, Any] | None = None


@reply("done")
@dataclass(frozen=True, kw_only=True)
class Done(Envelope):
    stats: dict[str, Any] | None = None


@reply("update")
@dataclass(frozen=True, kw_only=True)
class Update(Envelope):
    """One watch update: {"seq", "time", "dropped", "snapshot", "events"} (sllmd.watch)."""

    data: dict[str, Any]


@reply("heartbeat")
@dataclass(frozen=True, kw_only=True)
class Heartbeat(Envelope):
    pass


@reply("error")
@dataclass(frozen=True, kw_only=True)
class Error(Envelope):
    id: int | None = checked(in_range(0, MAX_ID), default=None)  # None: the request's id was unreadable
    code: str = checked(non_empty)
    message: str = ""
    exit_code: int = 1


# Requests that may run for long: each gets its own thread, at most `max_streams` at once.
LONG_RUNNING = frozenset({"import", "infer", "load", "evict", "remove", "migrate", "watch"})
