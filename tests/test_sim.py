"""The cluster simulator (sllmd/cluster/sim): determinism, the same placement code path as the
daemon, scenarios with a known answer, migration and preemption mechanics, the CLI verb."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sllmd.cluster import placement
from sllmd.cluster.sim import config, load, policies, report, run_scenario, workload
from sllmd.cluster.sim.engine import Simulation, simulate
from sllmd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "examples" / "sim" / "paper.toml"
GB = 1e9


def scenario(tmp_path, trace_rows=None, *, servers=None, models=None, t_out=50, **sim):
    doc = {"sim": dict({"seed": 3, "duration_s": 60, "rps": 1.0, "policies": ["ours"]}, **sim),
           "servers": dict({"count": 1, "gpus": 1, "gpu_bytes": "48GB", "dram_bytes": "100GB", "ssd_bytes": "1TB",
                            "bandwidth": {"ssd_dram": "4GB/s", "dram_device": "16GB/s", "network": "8Gbps"}},
                           **(servers or {})),
           "models": models or [{"name": "m", "bytes": "8GB", "dram_copies": 1, "prefill_s": 0.05,
                                 "prefill_s_per_token": 0.001, "tpot_s": 0.02}],
           "workload": {"lengths": "fixed", "t_in": 100, "t_out": t_out}}   # what nodes expect
    if trace_rows is not None:
        trace = tmp_path / "trace.csv"
        trace.write_text("time_s,model,t_in,t_out\n" + "".join(",".join(map(str, r)) + "\n" for r in trace_rows))
        doc["workload"].update(arrival="trace", trace=str(trace))
    return config.from_dict(doc, base=tmp_path)


def startups(result):
    return [r["first_token"] - r["arrival"] for r in result["rows"]]


# --- known answers ------------------------------------------------------------------------
PREFILL = 0.05 + 0.001 * 100     # prefill_s + t_in * prefill_s_per_token


@pytest.mark.parametrize("copies,path,load_s", [
    ({"dram_copies": 1}, "dram", 8 / 16),          # size / b(dram_device)
    ({"ssd_copies": 1}, "ssd", 8 / 4),             # size / b(ssd_device) = the slower stage
    ({"ssd_copies": 0}, "repo", 8 / 1 + 8 / 4),    # size / b(repo_ssd: 8 Gbps) + size / b(ssd_device)
], ids=["dram", "ssd", "repository"])
def test_one_model_one_server_gives_the_analytic_latency(tmp_path, copies, path, load_s):
    m = dict({"name": "m", "bytes": "8GB", "prefill_s": 0.05, "prefill_s_per_token": 0.001, "tpot_s": 0.02}, **copies)
    sc = scenario(tmp_path, [(1.0, "m", 100, 50), (30.0, "m", 100, 50)], models=[m])
    for policy in ("ours", "locality", "load-only", "random", "round-robin", "shepherd"):
        res = simulate(sc, policy, 1.0)
        first, second = res["rows"]
        assert (first["path"], second["path"]) == (path, "instance"), policy
        assert startups(res) == pytest.approx([load_s + PREFILL, PREFILL]), policy
        assert first["end"] - first["first_token"] == pytest.approx(50 * 0.02)
        assert first["estimate_s"] == pytest.approx(load_s)     # place()'s estimate is the simulated time
    bound = simulate(sc, "oracle", 1.0)
    assert startups(bound) == pytest.approx([PREFILL, PREFILL])


def test_a_queued_request_waits_for_the_one_ahead(tmp_path):
    sc = scenario(tmp_path, [(1.0, "m", 100, 50), (1.1, "m", 100, 50)])
    res = simulate(sc, "locality", 1.0)
    a, b = res["rows"]
    assert b["path"] == "instance"
    assert b["first_token"] == pytest.approx(a["end"] + PREFILL)


# --- determinism --------------------------------------------------------------------------
def _simulated(result):
    return [(r["id"], r["model"], r["arrival"], r["first_token"], r["end"], r["node"], r["path"]) for r in result["rows"]]


def test_a_seed_names_a_run():
    sc = load(PAPER).with_(duration_s=60)
    for policy in ("ours", "random", "shepherd"):
        a, b = simulate(sc, policy, 0.8), simulate(sc, policy, 0.8)
        assert _simulated(a) == _simulated(b) and a["counts"] == b["counts"]
    other = simulate(sc.with_(seed=99), "ours", 0.8)
    assert _simulated(other) != _simulated(simulate(sc, "ours", 0.8))


# --- the same code path -------------------------------------------------------------------
def test_policies_use_the_daemons_place():
    assert policies.place is placement.place and policies.Estimate is placement.Estimate


@pytest.mark.parametrize("policy", ["ours", "locality", "shepherd", "load-only", "random", "round-robin"])
def test_each_decision_is_place_on_the_same_states(policy):
    sc = load(PAPER).with_(duration_s=90)
    checked = []

    def check(req, now, views, choice):
        for v in views:     # the states have local_state's shape
            assert {"models", "tiers", "instances", "queue_delay_s", "bandwidths", "requests"} <= set(v.state)
        pol = sim.policy
        if isinstance(pol, policies.Locality):
            d = placement.place(req.model, views, now, stale_after_s=sc.stale_after_s,
                                repository=pol.repository, migration=pol.hook(req.model, views, now))
            expect = d.winner
        else:
            d = placement.place(req.model, views, now, stale_after_s=sc.stale_after_s, repository=pol.repository)
            warm = d.winner if d.winner is not None and d.winner.path == "instance" and d.winner.seconds == 0 else None
            alone = {v.name: placement.place(req.model, [v], now, stale_after_s=sc.stale_after_s,
                                             repository=pol.repository).winner for v in views}
            if choice is None:
                assert warm is None and all(e is None for e in alone.values())
                return
            expect = warm or alone[choice.node]
        if choice is None:
            assert expect is None
            return
        assert (choice.node, choice.path, choice.estimate.seconds) == (expect.node, expect.path, expect.seconds)
        assert choice.estimate.detail == expect.detail
        checked.append(choice.path)

    sim = Simulation(sc, policy, 1.5, on_decision=check)
    sim.run()
    assert len(checked) > 60
    if policy in ("ours", "shepherd"):      # the hook's options were among the decisions compared
        assert "migration" in checked and sim.counts["migrations"] + sim.counts["preemptions"] > 0


# --- migration and preemption -------------------------------------------------------------
def _contended(tmp_path):
    """Two 1-GPU servers. X (a long request) runs on s0; then M arrives, held only in s0's DRAM.
    s1 holds X on SSD: moving X there frees s0's GPU for M."""
    models = [{"name": "x", "bytes": "8GB", "ssd_copies": 2, "prefill_s": 0.0, "prefill_s_per_token": 0.0,
               "tpot_s": 0.05, "migration_a": 0.001, "migration_b0": 0.2},
              {"name": "m", "bytes": "8GB", "ssd_copies": 0, "prefill_s": 0.0, "prefill_s_per_token": 0.0,
               "tpot_s": 0.02}]
    sc = scenario(tmp_path, [(0.0, "x", 100, 1000), (10.0, "m", 10, 10)], models=models, t_out=1000,
                  servers={"count": 2, "bandwidth": {"ssd_dram": "4GB/s", "dram_device": "16GB/s", "network": "1Gbps"}})
    return sc


def test_ours_migrates_the_running_request_and_keeps_its_tokens(tmp_path):
    sc = _contended(tmp_path)
    sim = Simulation(sc, "ours", 1.0)
    # m is in s0's DRAM only (the seeding puts x on both SSDs; m nowhere): put it there by hand
    sim.servers[0].dram.insert("m", 8 * GB)
    res = sim.run()
    x, m = res["rows"]
    assert x["node"] == "s0" and res["counts"]["migrations"] == 1 and x["migrations"] == 1
    assert m["node"] == "s0" and m["path"] == "migration"
    # handoff: s1 loads x from SSD (2 s), re-prefills 100 + tokens so far (at t=12: 12/0.05 = 240)
    handoff = 10.0 + 2.0 + 0.001 * (100 + 240) + 0.2
    assert m["first_token"] == pytest.approx(handoff + 8 / 16, abs=0.06)
    # x loses nothing: its 1000 tokens take 1000 * 0.05 s after its 2 s load, wherever they run
    assert x["end"] == pytest.approx(2.0 + 1000 * 0.05, abs=0.06)
    locality = Simulation(sc, "locality", 1.0)
    locality.servers[0].dram.insert("m", 8 * GB)
    lm = locality.run()["rows"][1]
    assert lm["first_token"] - lm["arrival"] > m["first_token"] - m["arrival"]


def test_shepherd_preempts_and_the_victim_starts_over(tmp_path):
    sc = _contended(tmp_path)
    sim = Simulation(sc, "shepherd", 1.0)
    sim.servers[0].dram.insert("m", 8 * GB)
    res = sim.run()
    x, m = res["rows"]
    assert res["counts"]["preemptions"] == 1 and x["preemptions"] == 1 and m["path"] == "migration"
    assert m["first_token"] == pytest.approx(10.0 + 8 / 16)
    assert x["end"] > 10.0 + 1000 * 0.05      # all 1000 tokens again, after t=10


# --- workload and config ------------------------------------------------------------------
def test_gamma_arrivals_have_the_asked_cv_and_rate():
    import random
    import statistics
    times = workload.arrivals("gamma", 5.0, 4000.0, 2.0, random.Random(1))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) / 4000.0 == pytest.approx(5.0, rel=0.1)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(2.0, rel=0.15)


def test_zipf_popularity_favours_the_first_models():
    sc = load(PAPER).with_(duration_s=600)
    reqs = workload.generate(sc, 2.0)
    counts = {m.name: 0 for m in sc.models}
    for r in reqs:
        counts[r.model] += 1
    names = [m.name for m in sc.models]
    assert counts[names[0]] > counts[names[-1]] * 3


@pytest.mark.parametrize("text,value", [("13.4GB", 13.4e9), ("512GiB", 512 * 2**30), ("10Gbps", 1.25e9),
                                        ("25GB/s", 25e9), (7, 7.0), ("2TB", 2e12)])
def test_quantities(text, value):
    assert config.quantity(text, "x") == pytest.approx(value)


@pytest.mark.parametrize("change,match", [
    ({"sim": {"policies": ["clever"]}}, "unknown clever"),
    ({"servers": {"gpu_bytes": "lots"}}, "not a size"),
    ({"workload": {"arrival": "trace"}}, "needs workload.trace"),
    ({"models": [{"name": "big", "bytes": "500GB"}]}, "needs 11 GPUs"),
    ({"models": []}, "at least one"),
])
def test_config_errors(tmp_path, change, match):
    doc = {"sim": {}, "servers": {"gpus": 4}, "models": [{"name": "m", "bytes": "1GB"}], "workload": {}}
    for k, v in change.items():
        doc[k] = dict(doc[k], **v) if isinstance(v, dict) else v
    with pytest.raises(ConfigError, match=match):
        config.from_dict(doc, base=tmp_path)


def test_examples_load():
    for path in sorted((ROOT / "examples" / "sim").glob("*.toml")):
        sc = load(path)
        assert sc.models and sc.servers.count >= 1, path


def test_report_ratios_and_table():
    sc = load(PAPER).with_(duration_s=60)
    rep = run_scenario(sc, policies=["ours", "load-only"], rps=[0.5])
    (ratio,) = rep["ratios"]
    ours = rep["runs"][0]["summary"]["startup_s"]
    other = rep["runs"][1]["summary"]["startup_s"]
    assert ratio["p99_ratio"] == pytest.approx(other["p99"] / ours["p99"])
    assert "| 0.5 | ours |" in report.table(rep)


def test_the_cli_verb_runs_an_example_with_json(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sllmctl", "simulate", str(PAPER), "--json", "--duration", "60",
                          "--rps", "0.5", "1"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={"PYTHONPATH": f"{ROOT}:{ROOT / 'cli'}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["scenario"] == "paper" and rep["servers"] == 4
    assert {(r["policy"], r["rps"]) for r in rep["runs"]} == {(p, r) for p in config.POLICIES for r in (0.5, 1.0)}
    assert all(r["summary"]["completed"] == r["summary"]["requests"] for r in rep["runs"])
    bad = subprocess.run([sys.executable, "-m", "sllmctl", "simulate", str(tmp_path / "none.toml")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PYTHONPATH": f"{ROOT}:{ROOT / 'cli'}", "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 78 and "no such scenario file" in bad.stderr



def test_the_loopback_scenario_places_on_the_dram_copy_with_the_analytic_latency():
    """examples/sim/loopback.toml (issue 11 item 4, for the comparison with real nodes): explicit
    placement (B's DRAM, C's SSD), a trace, one request at a time."""
    sc = load(ROOT / "examples" / "sim" / "loopback.toml")
    res = simulate(sc, "ours", 1.0)
    first, second, third = res["rows"]
    assert (first["node"], first["path"]) == ("s1", "dram")
    assert first["first_token"] - first["arrival"] == pytest.approx(0.27 / 6 + 0.05 + 0.003 * 16)
    assert (second["path"], third["path"]) == ("instance", "instance")
    assert third["first_token"] - third["arrival"] == pytest.approx(0.05 + 0.003 * 64)


def test_explicit_placement_must_name_servers(tmp_path):
    doc = {"servers": {"count": 2}, "models": [{"name": "m", "bytes": "1GB", "ssd_on": [2]}]}
    with pytest.raises(ConfigError, match="server indices 0..1"):
        config.from_dict(doc, base=tmp_path)


def test_runs_are_the_same_across_processes_and_hash_seeds(tmp_path):
    def run(hash_seed):
        out = subprocess.run([sys.executable, "-m", "sllmctl", "simulate", str(PAPER), "--json", "--duration", "60",
                              "--rps", "1.5", "--policy", "ours", "--policy", "shepherd"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={"PYTHONPATH": f"{ROOT}:{ROOT / 'cli'}", "PATH": "/usr/bin:/bin",
                                  "PYTHONHASHSEED": hash_seed})
        assert out.returncode == 0, out.stderr
        rep = json.loads(out.stdout)
        for r in rep["runs"]:
            r["summary"].pop("decision_ms")    # wall-clock time: the only field that may differ
        return rep
    assert run("1") == run("2")
