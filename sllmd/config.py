"""The daemon's one config object: defaults < TOML file < SLLMD_* environment < flags.

Every setting is declared once in SETTINGS with its TOML key, its parser and
its help text; the environment variable is SLLMD_<KEY> and the flag
--<key-with-dashes>. `load_config` reads the environment it is given (the
only place sllmd reads its settings from the environment) and returns a
frozen `Config` that is passed explicitly to whoever needs it.

Config file: --config FILE, else $SLLMD_CONFIG, else
$CONFIGURATION_DIRECTORY/sllmd.toml (systemd's ConfigurationDirectory=),
else $XDG_CONFIG_HOME/sllm/sllmd.toml (~/.config/...) when it exists.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket as _socket
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from sllmd.errors import ConfigError, Exit
from sllmd.units import GiB, KiB, MiB, format_size, parse_duration, parse_optional_size, parse_size  # noqa: F401
from sllmd.inference.compute_dtype import parse_compute_dtype

EX_CONFIG = Exit.CONFIG   # systemd shows it as "CONFIG" and the unit does not restart on it


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not a boolean: {value!r}")


def parse_int(value: str | int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"not an integer: {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"not an integer: {value!r}") from None


def parse_mode(value: str | int) -> int:
    """A file mode, e.g. "0660" or 0o660 (octal in strings)."""
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        try:
            mode = int(str(value), 8)
        except ValueError:
            raise ConfigError(f"not an octal file mode: {value!r}") from None
    if mode & ~0o777:
        raise ConfigError(f"not a file mode: {oct(mode)}")
    if mode & 0o007:
        raise ConfigError(f"socket mode {oct(mode)} would let every user on the host drive the daemon")
    return mode


def parse_log_level(value: str) -> str:
    level = str(value).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"not a log level: {value!r} (debug, info, warning, error)")
    return level


def parse_device(value: str) -> str:
    text = str(value).strip().lower()
    if text in ("cpu", "auto") or re.fullmatch(r"cuda(:\d+)?", text):
        return "cuda:0" if text == "cuda" else text
    raise ConfigError(f"not a device: {value!r} (cpu, cuda:N, auto)")


# --- the config object ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    # Defaults for socket and store_dir come from the process environment when a Config is built
    # directly (as tests do); load_config passes the environment it was given instead.
    socket: str = dataclasses.field(default_factory=lambda: default_socket_path(os.environ))
    store_dir: Path = dataclasses.field(default_factory=lambda: default_store_dir(os.environ))
    ssd_capacity_bytes: int | None = None
    dram_bytes: int = 2 * GiB
    chunk_size: int = 16 * MiB
    device: str = "cpu"
    device_memory_bytes: int = 4 * GiB
    compute_dtype: str = "auto"         # the dtype models compute in (sllmd.inference.compute_dtype)
    keep_alive_s: float = 300.0
    queue_depth: int = 16
    max_batch: int = 8                  # requests one instance decodes together (continuous batching)
    max_frame_bytes: int = 16 * MiB
    verify_checksums: bool = True
    log_level: str = "INFO"
    socket_mode: int = 0o600            # 0660 lets the socket's group use the daemon
    max_streams: int = 64               # concurrent long-running requests (infer, import, load...) before "busy"
    shutdown_grace_s: float = 10.0      # how long a stop waits for in-flight requests before failing them
    heartbeat_s: float = 1.0            # silence after which the daemon tells a client it is still working
    prefault: bool = False              # fault the whole DRAM pool in at start (background) instead of on use
    load_wait_s: float = 300.0          # how long a request waits for its model's load before load_timeout
    room_wait_s: float = 30.0           # how long a load waits for busy instances to leave device room
    # the cluster (DESIGN.md 8): all off unless peer_listen is set
    node_name: str = dataclasses.field(default_factory=lambda: _socket.gethostname())
    peer_listen: str | None = None      # tcp://HOST:PORT, CurveZMQ; enables the cluster
    gossip_listen: str | None = None    # Serf bind HOST:PORT; 127.0.0.1:7946 when the cluster is on
    serf_rpc: str | None = None         # attach to a running agent's RPC instead of starting one
    join: tuple[str, ...] = ()          # Serf addresses to join, retried until one answers
    cluster_key: Path | None = None     # Serf's gossip encryption key (sllmctl keygen), mode 0600
    state_dir: Path | None = None       # the node's Curve key pair; default STORE/.state
    serf_profile: str = "lan"           # lan, wan or local (Serf's timing profiles)
    # the HTTP front end (DESIGN.md 10): off unless http is set
    http: str | None = None             # HOST:PORT serving the OpenAI API, /metrics and /healthz
    api_key_file: Path | None = None    # with http: /v1 needs `Authorization: Bearer KEY` (mode 0600)
    # model repositories (DESIGN.md 11): the tier below SSD
    repositories: tuple[str, ...] = ()  # file://, http:// or https:// URLs of repositories, searched in order
    download_connections: int = 4       # parallel Range requests per download (bench/repository_bench.py)
    download_timeout_s: float = 30.0    # a connection silent this long is a stall: retried
    download_retries: int = 5           # attempts per piece on stalls and 5xx before the download fails

    @property
    def cluster_enabled(self) -> bool:
        return self.peer_listen is not None


@dataclass(frozen=True)
class Setting:
    key: str                       # TOML key; SLLMD_<KEY>; --<key-with-dashes>
    field: str                     # Config field
    parse: Callable[[Any], Any]
    help: str
    metavar: str = "VALUE"
    default: str | None = None     # the default as --help states it; None: taken from Config
    repeat: bool = False           # a flag given several times (a list; comma-separated in the environment)

    @property
    def env(self) -> str:
        return "SLLMD_" + self.key.upper()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


SETTINGS: list[Setting] = [
    Setting("socket", "socket", lambda v: str(v), "Unix socket to listen on", "PATH",
            "$XDG_RUNTIME_DIR/sllm/sllmd.sock; /run/sllmd/sllmd.sock under systemd"),
    Setting("socket_mode", "socket_mode", parse_mode, "socket file permission, octal: 0600, or 0660 for a group",
            "MODE", "0600"),
    Setting("store", "store_dir", lambda v: Path(str(v)).expanduser(), "SSD tier: the checkpoint store directory",
            "DIR", "$XDG_DATA_HOME/sllm/store (~/.local/share/sllm/store); /var/lib/sllmd/store under systemd"),
    Setting("ssd_capacity", "ssd_capacity_bytes", parse_optional_size, "SSD tier capacity; none = unlimited",
            "SIZE", "none, the disk's free space is the limit"),
    Setting("dram", "dram_bytes", parse_size, "DRAM tier: chunk pool capacity", "SIZE",
            "min(4GiB, RAM/8), {dram} here"),
    Setting("chunk_size", "chunk_size", parse_size, "DRAM pool chunk size", "SIZE", "16MiB"),
    Setting("device", "device", parse_device, "device for model instances: cpu, cuda:N or auto", "DEV",
            "auto, i.e. cuda:0 when torch sees a GPU, else cpu"),
    Setting("device_memory", "device_memory_bytes", parse_size, "device tier: memory budget for instances", "SIZE",
            "90% of the GPU's memory on cuda; min(4GiB, RAM/8) on cpu, {cpu_device} here"),
    Setting("compute_dtype", "compute_dtype", parse_compute_dtype,
            "dtype models compute in: auto, bf16, fp16 or fp32 (cast when loaded; the store keeps the stored "
            "dtype; the device budget counts the cast size)", "DTYPE",
            "auto: bf16 on GPUs that support it; on a CPU bf16 for bf16 checkpoints where it has avx512_bf16 "
            "or amx_bf16, else fp32"),
    Setting("keep_alive", "keep_alive_s", parse_duration,
            "default keep_alive: 5m, 30s, -1 = forever, 0 = unload after the request", "DUR", "5m"),
    Setting("queue_depth", "queue_depth", parse_int, "per-instance request queue length", "N"),
    Setting("max_batch", "max_batch", parse_int, "requests one instance decodes together (continuous batching; "
            "beyond them requests queue); 1 serves one at a time", "N",
            "8 (measured: bench/batch_bench.py, BENCHMARKS.md)"),
    Setting("max_frame", "max_frame_bytes", parse_size, "largest accepted message", "SIZE"),
    Setting("verify_checksums", "verify_checksums", parse_bool, "verify checkpoint checksums while loading",
            "BOOL"),
    Setting("log_level", "log_level", parse_log_level, "debug, info, warning or error", "LEVEL", "info"),
    Setting("max_streams", "max_streams", parse_int, "concurrent long requests before answering busy", "N"),
    Setting("shutdown_grace", "shutdown_grace_s", parse_duration, "how long a stop waits for requests", "DUR"),
    Setting("heartbeat", "heartbeat_s", parse_duration, "heartbeat interval to clients", "DUR"),
    Setting("prefault", "prefault", parse_bool, "fault the whole DRAM pool in after start, in the background: "
            "first loads skip page faults, but the pool's memory is held from the start", "BOOL",
            "off, pages fault in as models are cached"),
    Setting("load_wait", "load_wait_s", parse_duration, "how long a request waits for its model to load "
            "before answering load_timeout (exit 75)", "DUR", "5m"),
    Setting("room_wait", "room_wait_s", parse_duration, "how long a load waits for busy instances to leave "
            "room on the device before answering out_of_memory (exit 75)", "DUR", "30s"),
]


def parse_host_port(value: str) -> str:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return text


def parse_peer_listen(value: str) -> str:
    text = str(value).strip()
    if not text.startswith("tcp://"):
        raise ConfigError(f"expected tcp://HOST:PORT, got {text!r}")
    parse_host_port(text.removeprefix("tcp://"))
    return text


def parse_join(value) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        out += [parse_host_port(part) for part in str(item).split(",") if part.strip()]
    return tuple(out)


def parse_node_name(value: str) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", text):
        raise ConfigError(f"expected letters, digits, '.', '_' or '-' (at most 63), got {text!r}")
    return text


def parse_serf_profile(value: str) -> str:
    text = str(value).strip().lower()
    if text not in ("lan", "wan", "local"):
        raise ConfigError(f"expected lan, wan or local, got {text!r}")
    return text


def _path(value) -> Path:
    return Path(str(value)).expanduser()


SETTINGS += [
    Setting("node_name", "node_name", parse_node_name, "this node's name in the cluster", "NAME", "the host name"),
    Setting("peer_listen", "peer_listen", parse_peer_listen, "peer socket (CurveZMQ); setting it joins a cluster",
            "tcp://HOST:PORT", "none: a single node"),
    Setting("gossip_listen", "gossip_listen", parse_host_port, "Serf gossip bind address", "HOST:PORT",
            "127.0.0.1:7946 with --peer-listen"),
    Setting("serf_rpc", "serf_rpc", parse_host_port, "attach to a running Serf agent's RPC instead of starting one",
            "HOST:PORT", "none: sllmd runs its own agent"),
    Setting("join", "join", parse_join, "a cluster member's gossip address to join (repeatable; retried)",
            "HOST:PORT", "none", repeat=True),
    Setting("cluster_key", "cluster_key", _path, "cluster key file (sllmctl keygen; mode 0600), needed with "
            "--peer-listen", "FILE", "none"),
    Setting("state_dir", "state_dir", _path, "node state: the Curve key pair", "DIR", "STORE/.state"),
    Setting("serf_profile", "serf_profile", parse_serf_profile, "Serf timing profile: lan, wan or local", "NAME",
            "lan"),
]


def parse_http_listen(value) -> str:
    """HOST:PORT for the HTTP front end; a bare PORT (or :PORT) is loopback, 127.0.0.1:PORT. Port 0 asks
    for a free one (the bound address is logged and in the READY status)."""
    text = str(value).strip()
    if text.isdigit() or (text.startswith(":") and text[1:].isdigit()):
        text = "127.0.0.1:" + text.lstrip(":")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT or PORT, got {str(value).strip()!r}")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ConfigError(f"an IPv6 host goes in brackets, e.g. [::1]:8000; got {text!r}")
    return text


SETTINGS += [
    Setting("http", "http", parse_http_listen, "serve the OpenAI API (/v1), /metrics and /healthz over HTTP on "
            "HOST:PORT; a bare PORT is loopback (127.0.0.1)", "HOST:PORT", "none: off"),
    Setting("api_key_file", "api_key_file", _path, "with --http: requests to /v1 need `Authorization: Bearer KEY`, "
            "KEY the file's first line (mode 0600)", "FILE", "none: no key asked"),
]


def parse_repository_url(value) -> tuple[str, ...]:
    """file:///DIR, http://HOST[:PORT]/PATH or https://...; repeatable (comma-separated in the environment)."""
    from urllib.parse import urlsplit
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        for text in (part.strip() for part in str(item).split(",")):
            if not text:
                continue
            try:
                url = urlsplit(text)
                url.port  # noqa: B018 - raises on a bad port
            except ValueError as e:
                raise ConfigError(f"not a repository URL: {text!r} ({e})") from None
            if url.scheme == "file" and url.path.startswith("/") and url.netloc in ("", "localhost"):
                out.append(text.rstrip("/") if url.path != "/" else text)
            elif url.scheme in ("http", "https") and url.hostname:
                out.append(text.rstrip("/"))
            else:
                raise ConfigError(f"not a repository URL: {text!r} (expected file:///DIR, http://HOST/PATH "
                                  f"or https://HOST/PATH)")
    return tuple(out)


SETTINGS += [
    Setting("repository", "repositories", parse_repository_url, "a model repository (file://, http://, https://: "
            "a directory of checkpoints with an index.json, e.g. served by nginx; `sllmctl publish` writes one); "
            "a model in no local tier is downloaded from the first that lists it (repeatable)", "URL", "none",
            repeat=True),
    Setting("download_connections", "download_connections", parse_int, "parallel HTTP Range requests per "
            "repository download", "N", "4"),
    Setting("download_timeout", "download_timeout_s", parse_duration, "a repository connection silent this long "
            "is a stall, retried with backoff", "DUR", "30s"),
    Setting("download_retries", "download_retries", parse_int, "attempts per piece of a download on stalls and "
            "5xx before it fails", "N", "5"),
]
_BY_KEY = {s.key: s for s in SETTINGS}


def default_socket_path(env: Mapping[str, str]) -> str:
    """$XDG_RUNTIME_DIR/sllm/sllmd.sock; /run/sllmd/sllmd.sock under systemd; else /tmp/sllm-$UID/sllmd.sock."""
    if env.get("RUNTIME_DIRECTORY"):
        return os.path.join(env["RUNTIME_DIRECTORY"].split(":")[0], "sllmd.sock")
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "sllm", "sllmd.sock")
    return f"/tmp/sllm-{os.getuid()}/sllmd.sock"


def default_store_dir(env: Mapping[str, str]) -> Path:
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0]) / "store"
    data_home = env.get("XDG_DATA_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "sllm" / "store"


def default_config_file(env: Mapping[str, str]) -> Path | None:
    candidates = []
    if env.get("CONFIGURATION_DIRECTORY"):
        candidates.append(Path(env["CONFIGURATION_DIRECTORY"].split(":")[0]) / "sllmd.toml")
    config_home = env.get("XDG_CONFIG_HOME") or (os.path.join(env["HOME"], ".config") if env.get("HOME") else None)
    if config_home:
        candidates.append(Path(config_home) / "sllm" / "sllmd.toml")
    return next((p for p in candidates if p.is_file()), None)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    section = data.get("sllmd", data)   # a [sllmd] table, or top-level keys
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [sllmd] must be a table")
    unknown = sorted(set(section) - set(_BY_KEY))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(_BY_KEY)}")
    return section


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch   # only the daemon resolves "auto", and it loads torch anyway
    return "cuda:0" if torch.cuda.is_available() else "cpu"


# Defaults sized for a daemon someone just started next to everything else on the host: the DRAM pool
# and (on a CPU host) the device budget are at most 4GiB and an eighth of RAM each, so together never
# more than a quarter of it. Room for models of a few GiB (SmolLM2-135M needs 0.26 GiB); larger
# models need --dram / --device-memory, which the config file or flags set explicitly.
DEFAULT_HOST_SHARE = 8
DEFAULT_HOST_CAP = 4 * GiB
_GRANULE = 2 * MiB    # the host arena's allocation unit (sllmd.pool.buffers.ARENA_GRANULE)


def default_dram_bytes(chunk_size: int = 16 * MiB, physical: int | None = None) -> int:
    physical = _physical_memory() if physical is None else physical
    share = min(DEFAULT_HOST_CAP, physical // DEFAULT_HOST_SHARE)
    return max(chunk_size, share // chunk_size * chunk_size)


def default_cpu_device_memory(physical: int | None = None) -> int:
    physical = _physical_memory() if physical is None else physical
    share = min(DEFAULT_HOST_CAP, physical // DEFAULT_HOST_SHARE)
    return max(_GRANULE, share // _GRANULE * _GRANULE)


def _cuda_total_memory(device: str) -> int:
    import torch
    _free, total = torch.cuda.mem_get_info(torch.device(device))
    return total


def _default_device_memory(device: str) -> int:
    if device.startswith("cuda"):
        return int(_cuda_total_memory(device) * 0.9)
    return default_cpu_device_memory()


def default_help(setting: Setting) -> str:
    """The default of a setting as --help shows it."""
    if setting.default is not None:
        return setting.default.format(dram=format_size(default_dram_bytes()),
                                      cpu_device=format_size(default_cpu_device_memory()))
    field = next(f for f in dataclasses.fields(Config) if f.name == setting.field)
    value = field.default
    if value is dataclasses.MISSING:
        return "see the README"
    if setting.parse in (parse_size, parse_optional_size):
        return "none" if value is None else format_size(value)
    if setting.parse is parse_bool:
        return "on" if value else "off"
    if setting.parse is parse_duration:
        return f"{value:g}s"
    return str(value)


def load_config(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                config_file: str | os.PathLike | None = None) -> Config:
    """The effective config: defaults < file < env < flags (flags keyed by TOML key; None = not given)."""
    env = dict(os.environ if env is None else env)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = sorted(set(flags) - set(_BY_KEY))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")

    path = config_file or env.get("SLLMD_CONFIG") or default_config_file(env)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path:
        layers.append((f"config file {path}", read_config_file(path)))
    layers.append(("environment", {s.key: env[s.env] for s in SETTINGS if s.env in env}))
    layers.append(("flags", flags))

    values: dict[str, Any] = {}
    for origin, layer in layers:
        for key, raw in layer.items():
            setting = _BY_KEY[key]
            try:
                values[setting.field] = setting.parse(raw)
            except ConfigError as e:
                raise ConfigError(f"{setting.key} (from {origin}): {e}") from None

    device = _resolve_device(values.get("device", "auto"))
    values["device"] = device
    check_device(device)
    values.setdefault("socket", default_socket_path(env))
    values.setdefault("store_dir", default_store_dir(env))
    values.setdefault("dram_bytes", default_dram_bytes(values.get("chunk_size", Config.chunk_size)))
    if "device_memory_bytes" not in values:
        values["device_memory_bytes"] = _default_device_memory(device)
    if values.get("peer_listen"):
        values.setdefault("gossip_listen", "127.0.0.1:7946")
        values.setdefault("state_dir", values["store_dir"] / ".state")
    config = Config(**values)
    validate(config)
    check_host(config)
    return config


def check_device(device: str) -> None:
    """A cuda device must exist in this torch (a CPU-only build has none)."""
    if not device.startswith("cuda"):
        return
    import torch
    index = int(device.partition(":")[2] or 0)
    if not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
        raise ConfigError(f"device: {device} asked for, but torch {torch.__version__} {why}; "
                          "use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device: {device} asked for, but torch sees {count} CUDA device(s) (cuda:0..{count - 1})")


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_host(config: Config) -> None:
    """Sizes this host cannot honour are refused here, before anything is allocated."""
    ram = _physical_memory()
    if config.dram_bytes > ram:
        raise ConfigError(f"dram: {format_size(config.dram_bytes)} is more than this host's memory "
                          f"({format_size(ram)})")
    if config.device.startswith("cpu"):
        if config.device_memory_bytes > ram:
            raise ConfigError(f"device_memory: {format_size(config.device_memory_bytes)} is more than this host's "
                              f"memory ({format_size(ram)}); on a CPU host instances live in RAM")
        if config.dram_bytes + config.device_memory_bytes > ram:
            raise ConfigError(f"dram + device_memory: {format_size(config.dram_bytes)} + "
                              f"{format_size(config.device_memory_bytes)} is more than this host's memory "
                              f"({format_size(ram)}); on a CPU host both live in RAM")
    elif config.device.startswith("cuda"):
        total = _cuda_total_memory(config.device)
        if config.device_memory_bytes > total:
            raise ConfigError(f"device_memory: {format_size(config.device_memory_bytes)} is more than "
                              f"{config.device}'s memory ({format_size(total)})")
    existing = _nearest_existing(config.store_dir)
    if not existing.is_dir():
        raise ConfigError(f"store: {existing} is not a directory (store = {config.store_dir})")
    if config.ssd_capacity_bytes is not None:
        st = os.statvfs(existing)
        disk = st.f_blocks * st.f_frsize
        if config.ssd_capacity_bytes > disk:
            raise ConfigError(f"ssd_capacity: {format_size(config.ssd_capacity_bytes)} is more than the disk "
                              f"under {existing} ({format_size(disk)})")


def prepare_socket_dir(config: Config) -> None:
    """Creates the directory of a Unix socket path (0700, as the transport would): one that cannot
    be made is a configuration error found before the daemon starts."""
    address = config.socket
    if "://" in address and not address.startswith("ipc://"):
        return
    parent = os.path.dirname(os.path.abspath(address.removeprefix("ipc://")))
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"socket: cannot create the directory {parent}: {e.strerror or e}") from None
    if not os.path.isdir(parent):
        raise ConfigError(f"socket: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"socket: {parent} is not writable by this user")


def prepare_store_dir(config: Config) -> None:
    """Creates the store directory and checks that it takes files: a store that cannot be
    written is a configuration error (exit 78), found before the daemon starts."""
    try:
        config.store_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=config.store_dir):
            pass
    except OSError as e:
        raise ConfigError(f"store: cannot use {config.store_dir}: {e.strerror or e}") from None


def validate(config: Config) -> None:
    def need(ok: bool, text: str):
        if not ok:
            raise ConfigError(text)
    need(bool(config.socket), "socket: an empty path")
    need(len(os.fsencode(config.socket)) <= 107, f"socket: path longer than 107 bytes: {config.socket}")
    from sllmd.transport.base import check_listen_address
    check_listen_address(config.socket)   # tcp:// waits for CurveZMQ
    need(config.chunk_size >= 1 * MiB and config.chunk_size % (4 * KiB) == 0,
         "chunk_size: must be at least 1MiB and a multiple of 4KiB")
    need(config.dram_bytes >= config.chunk_size, "dram: smaller than one chunk")
    need(config.device_memory_bytes > 0, "device_memory: must be positive")
    need(config.ssd_capacity_bytes is None or config.ssd_capacity_bytes > 0, "ssd_capacity: must be positive")
    need(config.queue_depth >= 1, "queue_depth: must be at least 1")
    need(1 <= config.max_batch <= 256, "max_batch: must be between 1 and 256")
    need(config.max_streams >= 1, "max_streams: must be at least 1")
    need(64 * KiB <= config.max_frame_bytes <= 1 * GiB, "max_frame: must be between 64KiB and 1GiB")
    need(config.shutdown_grace_s >= 0, "shutdown_grace: cannot be negative")
    need(0.05 <= config.heartbeat_s <= 60, "heartbeat: must be between 50ms and 60s")
    need(config.load_wait_s > 0, "load_wait: must be positive")
    need(config.room_wait_s >= 0, "room_wait: cannot be negative")
    need(1 <= config.download_connections <= 64, "download_connections: must be between 1 and 64")
    need(config.download_timeout_s > 0, "download_timeout: must be positive")
    need(config.download_retries >= 1, "download_retries: must be at least 1")
    if config.cluster_enabled:
        need(config.cluster_key is not None, "cluster_key: needed with peer_listen (make one: sllmctl keygen FILE)")
        from sllmd.cluster.cluster_key import load_cluster_key
        load_cluster_key(config.cluster_key)     # refuses a key readable by group or others
    else:
        for key in ("gossip_listen", "serf_rpc", "cluster_key"):
            need(getattr(config, key) is None, f"{key}: only with peer_listen (the cluster is off without it)")
        need(not config.join, "join: only with peer_listen (the cluster is off without it)")
    if config.api_key_file is not None:
        need(config.http is not None, "api_key_file: only with http (the HTTP front end is off without it)")
        from sllmd.http.auth import load_api_key
        load_api_key(config.api_key_file)        # refuses a key file readable by group or others


def as_dict(config: Config) -> dict[str, Any]:
    """The config keyed by TOML key, with plain values (for --print-config and `status`)."""
    out = {}
    for s in SETTINGS:
        value = getattr(config, s.field)
        if isinstance(value, Path):
            value = str(value)
        elif s.key == "socket_mode":
            value = f"{value:04o}"
        elif isinstance(value, tuple):
            value = list(value)
        out[s.key] = value
    return out


def add_flags(parser) -> None:
    """Adds every setting as a flag to an argparse parser (default None: not given)."""
    group = parser.add_argument_group("settings (also SLLMD_<NAME> in the environment, or the config file)")
    for s in SETTINGS:
        text = f"{s.help} (default: {default_help(s)})".replace("%", "%%")
        if s.parse is parse_bool:
            group.add_argument(s.flag, dest=s.key, default=None, action=argparse.BooleanOptionalAction, help=text)
        elif s.repeat:
            group.add_argument(s.flag, dest=s.key, default=None, action="append", metavar=s.metavar, help=text)
        else:
            group.add_argument(s.flag, dest=s.key, default=None, metavar=s.metavar, help=text)


def value_flags() -> set[str]:
    """The flags that take a value (for letting such a value start with "-", e.g. --keep-alive -1m)."""
    return {s.flag for s in SETTINGS if s.parse is not parse_bool}


def flags_from_args(args) -> dict[str, Any]:
    return {s.key: getattr(args, s.key, None) for s in SETTINGS}


def replace(config: Config, **changes) -> Config:
    new = dataclasses.replace(config, **changes)
    validate(new)
    return new
