"""GET /v1/models: every model the node (or, with a cluster, every alive node) knows, with where it is.

OpenAI's model object (`id`, `object`, `created`, `owned_by`) plus an sllm
field, `locations`: one entry per node holding the model, with its state and
the tiers it is in there (ssd, dram, device). A request for any listed model
works from this node: one not loaded here is placed and loaded (or forwarded)
like an IPC request.
"""
from __future__ import annotations

from typing import Any

OWNED_BY = "sllm"


def model_rows(node: Any, cluster: Any, node_name: str) -> list[dict]:
    """The models rows with a `node` column: cluster-wide with a cluster, else this node's."""
    if cluster is not None:
        return cluster.models_all()
    return [dict(r, node=node_name) for r in node.models()]


def model_objects(rows: list[dict]) -> list[dict]:
    """One OpenAI model object per model name, in name order."""
    by_name: dict[str, dict] = {}
    for r in rows:
        name = r.get("name")
        if not isinstance(name, str):
            continue
        obj = by_name.get(name)
        created = r.get("imported_at") or 0
        if obj is None:
            obj = by_name[name] = {"id": name, "object": "model", "created": int(created or 0), "owned_by": OWNED_BY,
                                   "locations": []}
        elif created:
            obj["created"] = min(obj["created"] or int(created), int(created))
        obj["locations"].append({"node": r.get("node"), "state": r.get("state"), "tiers": list(r.get("tiers") or [])})
    return [by_name[n] for n in sorted(by_name)]
