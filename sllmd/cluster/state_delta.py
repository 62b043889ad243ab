"""Deltas between two versions of a node's locality state (pure functions, table-tested).

A peer asks for the state since the answer it holds; when the server still has that answer it
sends only what changed: top-level keys whose value changed, and for the lists keyed by name
("models", "instances": they grow with the number of models) only the entries that changed
and the names that went. `apply_delta(old, diff(old, new)) == new` for every pair.

    delta = {"set": {key: value}, "drop": [key],
             "items": {list_key: {"upsert": [entry], "remove": [name], "order": [name]}}}
"""
from __future__ import annotations

import collections
import threading
from typing import Any

KEYED_LISTS = ("models", "instances")   # lists of maps with a unique "name"
HISTORY = 64                            # answers a server keeps to send deltas from (all peers share them)


def _by_name(items: Any) -> dict[str, dict] | None:
    if not isinstance(items, list):
        return None
    out: dict[str, dict] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or item["name"] in out:
            return None   # not a keyed list after all: sent whole
        out[item["name"]] = item
    return out


def diff(old: dict, new: dict) -> dict:
    """What turns `old` into `new`."""
    delta: dict[str, Any] = {"set": {}, "drop": [k for k in old if k not in new], "items": {}}
    for key, value in new.items():
        before = old.get(key)
        if key in old and before == value:
            continue
        if key in KEYED_LISTS:
            a, b = _by_name(before), _by_name(value)
            if a is not None and b is not None:
                delta["items"][key] = {"upsert": [item for name, item in b.items() if a.get(name) != item],
                                       "remove": [name for name in a if name not in b],
                                       "order": list(b)}
                continue
        delta["set"][key] = value
    return delta


def apply_delta(old: dict, delta: dict) -> dict:
    """`old` changed by `delta` (a new dict; `old` is left as it was). ValueError if malformed."""
    if not isinstance(delta, dict):
        raise ValueError("a state delta is a map")
    sets, drops, items = delta.get("set", {}), delta.get("drop", []), delta.get("items", {})
    if not isinstance(sets, dict) or not isinstance(drops, list) or not isinstance(items, dict):
        raise ValueError("a state delta has set (map), drop (list) and items (map)")
    new = {k: v for k, v in old.items() if k not in drops}
    new.update(sets)
    for key, change in items.items():
        current = _by_name(new.get(key, []))
        if current is None or not isinstance(change, dict):
            raise ValueError(f"state delta: {key} is not a list of named entries")
        upserts = change.get("upsert") or []
        removes = set(change.get("remove") or [])
        for item in upserts:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ValueError(f"state delta: an entry of {key} has no name")
            current[item["name"]] = item
        order = change.get("order")
        names = order if isinstance(order, list) else [n for n in current if n not in removes]
        try:
            new[key] = [current[name] for name in names if name not in removes]
        except (KeyError, TypeError):
            raise ValueError(f"state delta: {key} names an entry it does not carry") from None
    return new


class StateHistory:
    """The last few states a server sent, each under a serial number, to answer a pull with a
    delta from the one the caller holds. Keyed by serial, not by node version: some parts
    (a request's token counts) move without a version bump, so two answers at one version
    may differ, and a delta must start from exactly what that caller has."""

    def __init__(self, keep: int = HISTORY):
        self._states: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self._keep = keep
        self._serial = 0
        self._lock = threading.Lock()

    def answer(self, version: int, state: dict, since: int) -> dict:
        """The reply to a pull by a caller holding serial `since` (0: nothing): the delta from it
        when it is remembered, else the whole state."""
        with self._lock:
            base = self._states.get(since) if since else None
            self._serial += 1
            serial = self._serial
            self._states[serial] = state
            while len(self._states) > self._keep:
                self._states.popitem(last=False)
        if base is None:
            return {"version": version, "serial": serial, "state": state}
        return {"version": version, "serial": serial, "since": since, "delta": diff(base, state)}
