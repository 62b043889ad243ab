"""A simulated scenario, from a TOML file (see examples/sim/*.toml):

    [sim]        seed, duration_s (arrival window), rps (a number or a list: a sweep), policies,
                 refresh_s (a busy server's state is re-taken at least this often, default 0.5),
                 stale_after_s (placement's; default inf: with a finite value every state is
                 re-taken at least every refresh_s, as a gossiped version confirms a pulled copy)
    [servers]    count, gpus, gpu_bytes, dram_bytes, ssd_bytes, queue_depth,
                 [servers.bandwidth] ssd_dram, dram_device, ssd_device (else the slower of the two),
                 network (peer_ssd and repo_ssd unless given), peer_ssd, repo_ssd   (bytes/s)
    [[models]]   name, bytes, gpus (else ceil(bytes / gpu_bytes)), count (replicas: name-00, name-01 ...),
                 ssd_copies (servers holding it on SSD at start), dram_copies, prefill_s_per_token,
                 prefill_s, tpot_s (time per output token), migration_a, migration_b0 (section 8's a, b0),
                 ssd_on, dram_on (lists of server indices: where it is at start, instead of at random)
    [workload]   arrival (poisson | gamma | trace), cv (gamma), trace (file: time_s,model[,t_in,t_out]),
                 popularity (uniform | zipf), zipf_s, lengths (gsm8k | sharegpt | fixed | lognormal | a file),
                 t_in, t_out (fixed, or the lognormal means), sigma_in, sigma_out, max_tokens

Sizes accept numbers or strings with a unit ("13.4GB", "2TB", "512GiB"); bandwidths also
"10Gbps" (bits) or "25GB/s". Paths in the file are relative to it.
"""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path

from sllmd.errors import ConfigError

POLICIES = ("random", "round-robin", "load-only", "locality", "shepherd", "ours", "oracle")
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def quantity(value, what: str) -> float:
    """A size or bandwidth: a number, "13.4GB", "512GiB", "25GB/s" (bytes) or "10Gbps" (bits)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*?)(bps|/s)?\s*", value)
        if m and m.group(2).lower() in _UNITS:
            number = float(m.group(1)) * _UNITS[m.group(2).lower()]
            return number / 8 if m.group(3) == "bps" else number
    raise ConfigError(f"{what}: not a size or bandwidth: {value!r}")


@dataclasses.dataclass
class ModelSpec:
    name: str
    bytes: float
    gpus: int
    ssd_copies: int = 1
    dram_copies: int = 0
    prefill_s: float = 0.02
    prefill_s_per_token: float = 2e-4
    tpot_s: float = 0.03
    migration_a: float = 2e-4
    migration_b0: float = 0.1
    ssd_on: list | None = None     # server indices holding it on SSD at start (instead of ssd_copies at random)
    dram_on: list | None = None    # server indices holding it in DRAM (and on SSD) at start


@dataclasses.dataclass
class ServerSpec:
    count: int = 4
    gpus: int = 4
    gpu_bytes: float = 48e9
    dram_bytes: float = 512e9
    ssd_bytes: float = 2e12
    queue_depth: int = 4
    bandwidth: dict = dataclasses.field(default_factory=dict)   # path -> bytes/s (placement's paths)


@dataclasses.dataclass
class WorkloadSpec:
    arrival: str = "poisson"
    cv: float = 1.0
    trace: Path | None = None
    popularity: str = "uniform"
    zipf_s: float = 1.1
    lengths: str = "gsm8k"
    lengths_file: Path | None = None
    t_in: float = 64
    t_out: float = 128
    sigma_in: float = 0.5
    sigma_out: float = 0.5
    max_tokens: int = 2048


@dataclasses.dataclass
class Scenario:
    name: str
    seed: int
    duration_s: float
    rps: list[float]
    policies: list[str]
    stale_after_s: float
    refresh_s: float
    servers: ServerSpec
    models: list[ModelSpec]
    workload: WorkloadSpec

    def with_(self, **changes) -> "Scenario":
        return dataclasses.replace(self, **changes)


def _section(doc: dict, key: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def _bandwidths(raw: dict) -> dict:
    bw = {k: quantity(v, f"servers.bandwidth.{k}") for k, v in raw.items()}
    bw.setdefault("ssd_dram", 6e9)
    bw.setdefault("dram_device", 20e9)
    bw.setdefault("ssd_device", min(bw["ssd_dram"], bw["dram_device"]))
    net = bw.pop("network", 1.25e9)
    bw.setdefault("peer_ssd", net)
    bw.setdefault("repo_ssd", net)
    bad = set(bw) - {"ssd_dram", "dram_device", "ssd_device", "peer_ssd", "repo_ssd"}
    if bad:
        raise ConfigError(f"servers.bandwidth: unknown path(s) {', '.join(sorted(bad))}")
    return bw


def _models(rows, servers: ServerSpec) -> list[ModelSpec]:
    if not isinstance(rows, list) or not rows:
        raise ConfigError("at least one [[models]] table is needed")
    out: list[ModelSpec] = []
    for row in rows:
        row = dict(row)
        name = row.pop("name", None)
        if not name:
            raise ConfigError("[[models]] needs a name")
        size = quantity(row.pop("bytes", None) or row.pop("size", None) or 0, f"models.{name}.bytes")
        if size <= 0:
            raise ConfigError(f"models.{name}: bytes must be > 0")
        count = int(row.pop("count", 1))
        gpus = int(row.pop("gpus", 0)) or max(1, math.ceil(size / servers.gpu_bytes))
        if gpus > servers.gpus:
            raise ConfigError(f"models.{name}: needs {gpus} GPUs, a server has {servers.gpus}")
        fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"name", "bytes", "gpus"}
        unknown = set(row) - fields
        if unknown:
            raise ConfigError(f"models.{name}: unknown key(s) {', '.join(sorted(unknown))}")
        for key in ("ssd_on", "dram_on"):
            where = row.get(key)
            if where is not None and (not isinstance(where, list) or
                                      any(not isinstance(i, int) or not 0 <= i < servers.count for i in where)):
                raise ConfigError(f"models.{name}.{key}: a list of server indices 0..{servers.count - 1}")
        for i in range(count):
            label = name if count == 1 else f"{name}-{i:0{len(str(count - 1))}d}"
            out.append(ModelSpec(name=label, bytes=size, gpus=gpus, **row))
    return out


def from_dict(doc: dict, base: Path | None = None, name: str = "scenario") -> Scenario:
    base = base or Path.cwd()
    sim, srv, wl = _section(doc, "sim"), dict(_section(doc, "servers")), dict(_section(doc, "workload"))
    servers = ServerSpec(count=int(srv.get("count", 4)), gpus=int(srv.get("gpus", 4)),
                         gpu_bytes=quantity(srv.get("gpu_bytes", 48e9), "servers.gpu_bytes"),
                         dram_bytes=quantity(srv.get("dram_bytes", 512e9), "servers.dram_bytes"),
                         ssd_bytes=quantity(srv.get("ssd_bytes", 2e12), "servers.ssd_bytes"),
                         queue_depth=int(srv.get("queue_depth", 4)),
                         bandwidth=_bandwidths(srv.get("bandwidth", {})))
    if servers.count < 1 or servers.gpus < 1:
        raise ConfigError("servers.count and servers.gpus must be >= 1")
    rps = sim.get("rps", 1.0)
    rps = [float(r) for r in (rps if isinstance(rps, list) else [rps])]
    if not rps or min(rps) <= 0:
        raise ConfigError("sim.rps must be > 0")
    policies = list(sim.get("policies", POLICIES))
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ConfigError(f"sim.policies: unknown {', '.join(unknown)} (one of {', '.join(POLICIES)})")
    lengths = str(wl.get("lengths", "gsm8k"))
    lengths_file = None
    if lengths not in ("gsm8k", "sharegpt", "fixed", "lognormal"):
        lengths_file = (base / lengths).resolve()
        lengths = "file"
    trace = wl.get("trace")
    workload = WorkloadSpec(
        arrival=str(wl.get("arrival", "trace" if trace else "poisson")), cv=float(wl.get("cv", 1.0)),
        trace=(base / trace).resolve() if trace else None, popularity=str(wl.get("popularity", "uniform")),
        zipf_s=float(wl.get("zipf_s", 1.1)), lengths=lengths, lengths_file=lengths_file,
        t_in=float(wl.get("t_in", 64)), t_out=float(wl.get("t_out", 128)),
        sigma_in=float(wl.get("sigma_in", 0.5)), sigma_out=float(wl.get("sigma_out", 0.5)),
        max_tokens=int(wl.get("max_tokens", 2048)))
    if workload.arrival not in ("poisson", "gamma", "trace"):
        raise ConfigError(f"workload.arrival: {workload.arrival!r} (poisson, gamma or trace)")
    if workload.arrival == "trace" and workload.trace is None:
        raise ConfigError("workload.arrival = 'trace' needs workload.trace = FILE")
    if workload.popularity not in ("uniform", "zipf"):
        raise ConfigError(f"workload.popularity: {workload.popularity!r} (uniform or zipf)")
    if workload.cv <= 0:
        raise ConfigError("workload.cv must be > 0")
    return Scenario(name=str(sim.get("name", name)), seed=int(sim.get("seed", 1)),
                    duration_s=float(sim.get("duration_s", 300.0)), rps=rps, policies=policies,
                    stale_after_s=float(sim.get("stale_after_s", "inf")), refresh_s=float(sim.get("refresh_s", 0.5)),
                    servers=servers, models=_models(doc.get("models"), servers), workload=workload)


def load(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such scenario file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    return from_dict(doc, base=path.parent, name=path.stem)
