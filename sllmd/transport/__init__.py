"""How frames move between clients and the daemon: an interface, ZeroMQ, and an in-memory fake."""
from .base import ClientEndpoint, Received, SendResult, ServerEndpoint, Transport, check_listen_address
from .credentials import Credentials, check_readable
from .memory import MemoryTransport
from .zmq_transport import ZmqTransport, ipc_path, make_socket, probe_ipc

__all__ = ["ClientEndpoint", "Credentials", "MemoryTransport", "Received", "SendResult", "ServerEndpoint", "Transport",
           "ZmqTransport", "check_listen_address", "check_readable", "ipc_path", "make_socket", "probe_ipc"]
