"""Table tests for the pure keep-alive and eviction policy, and the model states derived from the tiers."""
from __future__ import annotations

import math

import pytest

from sllmd.tiers import policy
from sllmd.tiers.policy import Candidate
from sllmd.tiers.states import EvictReason, ModelState, Tier, derive_state


@pytest.mark.parametrize("requested, default, expected", [
    (None, 300.0, 300.0),
    (None, -1, -1.0),
    (0, 300.0, 0.0),
    (5.5, 300.0, 5.5),
    (-1, 300.0, -1.0),
    (math.inf, 0, math.inf),
])
def test_keep_alive_or_default(requested, default, expected):
    assert policy.keep_alive_or_default(requested, default) == expected


def test_keep_alive_nan_is_refused():
    with pytest.raises(ValueError):
        policy.keep_alive_or_default(math.nan, 300)


@pytest.mark.parametrize("keep_alive, finished, expected", [
    (300.0, 1000.0, 1300.0),
    (0.0, 1000.0, 1000.0),   # unload as soon as idle
    (-1.0, 1000.0, None),    # forever
    (-0.001, 1000.0, None),
    (math.inf, 1000.0, None),
    (0.25, 10.0, 10.25),
])
def test_expires_at(keep_alive, finished, expected):
    assert policy.expires_at(keep_alive, finished) == expected


@pytest.mark.parametrize("deadline, now, busy, expected", [
    (100.0, 99.9, False, False),
    (100.0, 100.0, False, True),
    (100.0, 500.0, False, True),
    (100.0, 500.0, True, False),   # a serving instance never expires
    (None, 1e12, False, False),    # forever
])
def test_is_expired(deadline, now, busy, expected):
    assert policy.is_expired(deadline, now, busy) is expected


def test_expired_lists_due_idle_instances_earliest_first():
    instances = [("late", 50.0, False), ("early", 10.0, False), ("busy", 5.0, True), ("never", None, False),
                 ("future", 200.0, False)]
    assert policy.expired(instances, now=100.0) == ["early", "late"]
    assert policy.expired(instances, now=1.0) == []


@pytest.mark.parametrize("deadlines, now, ceiling, expected", [
    ([], 0.0, 1.0, 1.0),
    ([None, None], 0.0, 1.0, 1.0),
    ([10.5], 10.0, 1.0, 0.5),
    ([10.5, 10.2], 10.0, 1.0, pytest.approx(0.2)),
    ([5.0], 10.0, 1.0, 0.0),       # overdue: wake now
    ([100.0], 10.0, 1.0, 1.0),     # far away: the ceiling
])
def test_next_wakeup(deadlines, now, ceiling, expected):
    assert policy.next_wakeup(deadlines, now, ceiling) == expected


A = Candidate("a", 100, last_used=1.0)
B = Candidate("b", 200, last_used=2.0)
C = Candidate("c", 300, last_used=3.0)
PINNED = Candidate("p", 1000, last_used=0.0, pinned=True)
BUSY = Candidate("x", 1000, last_used=0.5, busy=True)


@pytest.mark.parametrize("cands, need, free, exclude, expected", [
    ([A, B, C], 50, 100, (), []),                     # fits already
    ([A, B, C], 100, 100, (), []),                    # exactly fits
    ([A, B, C], 150, 100, (), ["a"]),                 # least recently used first
    ([A, B, C], 350, 100, (), ["a", "b"]),            # as few as needed, in LRU order
    ([C, B, A], 350, 100, (), ["a", "b"]),            # input order does not matter
    ([A, B, C], 700, 100, (), ["a", "b", "c"]),
    ([A, B, C], 701, 100, (), None),                  # impossible: evict nothing
    ([PINNED, A, B], 250, 0, (), ["a", "b"]),         # pinned is skipped even though it is oldest
    ([BUSY, A], 100, 0, (), ["a"]),                   # serving is never evicted
    ([BUSY, PINNED], 1, 0, (), None),
    ([A, B], 150, 0, ("a",), ["b"]),                  # excluded (e.g. the model being admitted)
    ([], 1, 0, (), None),
    ([], 0, 0, (), []),
])
def test_choose_victims(cands, need, free, exclude, expected):
    assert policy.choose_victims(cands, need, free, exclude) == expected


def test_evictable_ties_break_by_name():
    cands = [Candidate("z", 1, 5.0), Candidate("m", 1, 5.0), Candidate("a", 1, 6.0)]
    assert [c.name for c in policy.evictable(cands)] == ["m", "z", "a"]


@pytest.mark.parametrize("parts, chunk, expected", [
    ([], 16, 0),
    ([0], 16, 0),
    ([1], 16, 1),
    ([16], 16, 1),
    ([17], 16, 2),
    ([16, 1, 33], 16, 1 + 1 + 3),  # each partition starts on a fresh chunk
])
def test_chunks_needed(parts, chunk, expected):
    assert policy.chunks_needed(parts, chunk) == expected


def test_chunks_needed_rejects_bad_chunk_size():
    with pytest.raises(ValueError):
        policy.chunks_needed([1], 0)


# --- states -------------------------------------------------------------------------
S = ModelState


@pytest.mark.parametrize("held, expected", [
    ({}, S.ON_SSD),
    ({"in_dram": True}, S.IN_DRAM),
    ({"loading": True}, S.LOADING),
    ({"loading": True, "in_dram": True}, S.LOADING),           # a load from the DRAM copy
    ({"on_device": True, "in_dram": True}, S.LOADED),
    ({"on_device": True}, S.LOADED),                           # its DRAM copy evicted, the instance runs on
    ({"stopping": True, "in_dram": True}, S.EVICTING),
    ({"stopping": True, "loading": True}, S.LOADING),          # requested again while the old one stops
    ({"stopping": True, "on_device": True}, S.LOADED),         # ...and the new one is ready first
    ({"failed": True}, S.FAILED),
    ({"failed": True, "loading": True}, S.LOADING),            # a retry
    ({"failed": True, "on_device": True}, S.LOADED),
    ({"broken": True}, S.FAILED),                              # unusable on disk: nothing else counts
    ({"broken": True, "in_dram": True, "on_device": True}, S.FAILED),
])
def test_state_is_derived_from_the_tiers(held, expected):
    assert derive_state(**held) is expected


def test_every_state_but_migrating_and_failed_is_reachable_from_the_tiers_alone():
    flags = ("loading", "on_device", "stopping", "in_dram")
    reached = {derive_state(**{f: bool(bits >> i & 1) for i, f in enumerate(flags)}) for bits in range(16)}
    assert reached == set(ModelState) - {S.MIGRATING, S.FAILED}


def test_eviction_reasons_are_the_design_s_and_failed():
    assert [r.value for r in EvictReason] == ["lru", "idle", "manual", "pressure", "failed"]


def test_tier_parse():
    assert Tier.parse("dram") is Tier.DRAM
    with pytest.raises(ValueError, match="unknown tier"):
        Tier.parse("gpu")
