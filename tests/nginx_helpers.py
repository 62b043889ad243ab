"""A real nginx over a directory, for the repository tests and bench: started as a child
(not a daemon) with its pid, logs and temp paths in its own directory, on a free loopback
port; the access log records each request's $bytes_sent, so a test can count what was served."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None)

CONF = """
{user}
worker_processes 2;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format served '$request_method $uri $status $bytes_sent "$http_range"';
    access_log {root}/access.log served;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000;
    types {{ application/json json; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {www};
        location / {{ {location} }}
        {server_extra}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx serving `www` at self.url; `location` adds directives to `location /` (e.g. 'limit_rate 1m;'),
    server_extra whole blocks (e.g. 'location ~ \\.bin$ { return 500; }')."""

    def __init__(self, root: Path, www: Path, location: str = "", server_extra: str = ""):
        self.root, self.www, self.location, self.server_extra = Path(root), Path(www), location, server_extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.root / "nginx.conf"
        # as root, nginx's workers would run as nobody, who cannot enter pytest's 0700 directories
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        conf.write_text(CONF.format(user=user, root=self.root, www=self.www, port=self.port, location=self.location,
                                    server_extra=self.server_extra))
        self.proc = subprocess.Popen([NGINX, "-p", str(self.root), "-c", str(conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=open(self.root / "stderr.log", "wb"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.root / 'stderr.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not listen within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def served(self) -> list[tuple[str, int, int, str]]:
        """(uri, status, bytes sent, range) per logged request."""
        out = []
        try:
            lines = (self.root / "access.log").read_text().splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            method, uri, status, sent, rng = line.split(" ", 4)
            out.append((uri, int(status), int(sent), rng.strip('"')))
        return out

    def bytes_served(self, suffix: str = ".bin") -> int:
        return sum(sent for uri, status, sent, _ in self.served() if uri.endswith(suffix))

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
