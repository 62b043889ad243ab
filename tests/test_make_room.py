"""The scheduler's migration option as pure functions: device room, the holder's wait, the option's price."""
from __future__ import annotations

import pytest

from sllmd.cluster.device_room import UNKNOWN_BUSY_S, room_for
from sllmd.cluster.locality import NodeView, state_problem
from sllmd.cluster.make_room import hook, run_moves
from sllmd.cluster.migration_cost import DEFAULT_A, DEFAULT_B0
from sllmd.cluster.placement import Estimate, place

NOW = 1000.0
MB = 1 << 20


def _holder(*, tokens_out=50, max_tokens=1000, age_s=5.0, req_state="running", leases=1, active=1):
    """X: B in DRAM, its device (100 MB) full with A, which serves one request."""
    return {
        "device": "cpu",
        "models": [{"name": "A", "state": "loaded", "tiers": ["ssd", "device"], "checkpoint_bytes": 100 * MB,
                    "device_bytes": 100 * MB},
                   {"name": "B", "state": "dram", "tiers": ["ssd", "dram"], "checkpoint_bytes": 100 * MB,
                    "load_bytes": 100 * MB}],
        "tiers": {"device": {"capacity_bytes": 100 * MB, "used_bytes": 100 * MB, "free_bytes": 0}},
        "instances": [{"name": "A", "state": "loaded", "active_requests": active, "queued": 0, "leases": leases,
                       "device_bytes": 100 * MB, "queue_depth": 16}],
        "requests": [{"id": "r1", "model": "A", "state": req_state, "tokens_in": 10, "tokens_out": tokens_out,
                      "max_tokens": max_tokens, "age_s": age_s}],
        "bandwidths": {"dram_device": 1e9, "ssd_device": 1e9},
    }


def _spare(with_a=True):
    """Y: an empty device; A on its SSD (or nothing)."""
    return {
        "device": "cpu",
        "models": [{"name": "A", "state": "ssd", "tiers": ["ssd"], "checkpoint_bytes": 100 * MB,
                    "load_bytes": 100 * MB}] if with_a else [],
        "tiers": {"device": {"capacity_bytes": 100 * MB, "used_bytes": 0, "free_bytes": 100 * MB}},
        "instances": [], "requests": [],
        "bandwidths": {"dram_device": 1e9, "ssd_device": 1e9},
    }


def _views(x, y):
    return [NodeView("X", "alive", x, 1, NOW), NodeView("Y", "alive", y, 1, NOW)]


def _b(state):
    return next(m for m in state["models"] if m["name"] == "B")


def test_a_device_full_of_a_busy_instance_waits_for_its_slowest_request():
    room = room_for(_holder(), _b(_holder()))
    assert room.blocking == ("A",)
    assert room.wait_s == pytest.approx(950 * 5.0 / 50)   # tokens left at the rate so far


@pytest.mark.parametrize("change, wait", [
    (dict(leases=0, active=0), 0.0),                  # an idle instance is evicted at once: room now
    (dict(tokens_out=0), UNKNOWN_BUSY_S),             # nothing decoded yet: no rate to go by
    (dict(max_tokens=60, age_s=1.0), 10 * 1.0 / 50),  # nearly done
])
def test_room_wait_follows_the_busy_instances(change, wait):
    x = _holder(**change)
    if change.get("active") == 0:
        x["requests"] = []
    assert room_for(x, _b(x)).wait_s == pytest.approx(wait)


def test_a_state_without_device_figures_or_a_model_that_never_fits_has_no_wait():
    x = _holder()
    assert room_for(dict(x, tiers={}), _b(x)).wait_s == 0.0
    big = dict(_b(x), load_bytes=500 * MB)
    assert room_for(x, big).wait_s == 0.0    # the node refuses it itself (too large), no wait to price


def test_the_holder_cost_includes_the_wait_for_room():
    d = place("B", _views(_holder(), _spare(with_a=False)), NOW)
    assert (d.winner.node, d.winner.path) == ("X", "dram")
    assert d.winner.seconds == pytest.approx(95.0 + 100 * MB / 1e9)
    assert d.winner.detail["room_wait_s"] == pytest.approx(95.0) and d.winner.detail["blocking"] == ["A"]


def test_moving_the_busy_request_wins_when_its_wait_is_long():
    views = _views(_holder(), _spare())
    d = place("B", views, NOW, migration=hook(views, NOW, stale_after_s=10.0))
    w = d.winner
    assert (w.node, w.path) == ("X", "migration"), d
    (move,) = w.detail["moves"]
    assert move == {"request_id": "r1", "model": "A", "to": "Y", "to_path": "ssd", "to_s": pytest.approx(0.1048576),
                    "tokens": 60, "migration_s": pytest.approx(DEFAULT_A * 60 + DEFAULT_B0)}
    load = 100 * MB / 1e9
    assert w.seconds == pytest.approx(move["to_s"] + move["migration_s"] + load)
    assert d.runner_up is None   # X's plain load (after a 95 s wait) gave way to its better option; Y has no B


def test_the_fit_in_the_state_prices_the_move():
    x = dict(_holder(), migration={"a_s_per_token": 0.01, "b0_s": 0.05, "samples": 3})
    views = _views(x, _spare())
    w = place("B", views, NOW, migration=hook(views, NOW, stale_after_s=10.0)).winner
    assert w.detail["moves"][0]["migration_s"] == pytest.approx(0.01 * 60 + 0.05)


@pytest.mark.parametrize("x, y, why", [
    (_holder(max_tokens=55, age_s=0.5), _spare(), "it ends sooner than a move"),
    (_holder(), _spare(with_a=False), "no other node can run A"),
    (_holder(req_state="migrating"), _spare(), "already moving"),
])
def test_no_move_when_it_does_not_pay_or_cannot_happen(x, y, why):
    views = _views(x, y)
    w = place("B", views, NOW, migration=hook(views, NOW, stale_after_s=10.0)).winner
    assert w.path == "dram", why


def test_run_moves_reports_each_move_and_never_raises():
    e = Estimate("X", "migration", 1.0, {"moves": [{"request_id": "r1", "to": "Y"}, {"request_id": "r2", "to": "Y"}]})

    def migrate(rid, to, reason):
        assert reason == "room for a request on X"
        if rid == "r2":
            from sllmd.errors import RequestNotFoundError
            raise RequestNotFoundError("finished")
        return {"ran_on": to, "total_s": 0.3}
    got = run_moves(e, migrate)
    assert got[0] == {"request_id": "r1", "to": "Y", "ran_on": "Y", "total_s": 0.3, "ok": True}
    assert got[1]["ok"] is False and got[1]["error"] == "request_not_found"


def test_a_peer_state_with_bad_request_or_device_figures_is_refused():
    x = _holder()
    assert state_problem(x) is None
    assert "max_tokens" in state_problem(dict(x, requests=[dict(x["requests"][0], max_tokens=float("inf"))]))
    assert "tiers.device" in state_problem(dict(x, tiers={"device": {"free_bytes": "lots"}}))
    assert "requests" in state_problem(dict(x, requests="many"))
