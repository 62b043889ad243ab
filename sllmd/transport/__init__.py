"""How frames move between clients and the daemon: an interface, ZeroMQ, and an in-memory fake."""
from .base import ClientEndpoint, SendResult, ServerEndpoint, Transport
from .memory import MemoryTransport
from .zmq_transport import ZmqTransport, ipc_path, make_socket, probe_ipc

__all__ = ["ClientEndpoint", "MemoryTransport", "SendResult", "ServerEndpoint", "Transport", "ZmqTransport",
           "ipc_path", "make_socket", "probe_ipc"]
