"""The migration time model a*(t_in + t_out) + b0, fitted from real migrations (pure arithmetic)."""
import pytest

from sllmd.cluster.migration_cost import DEFAULT_A, DEFAULT_B0, MigrationCost, fit


@pytest.mark.parametrize("samples,a,b0", [
    ([], DEFAULT_A, DEFAULT_B0),
    ([(100, 1.0)], DEFAULT_A, 1.0 - DEFAULT_A * 100),              # one sample: the default slope
    ([(100, 1.0), (100, 3.0)], DEFAULT_A, 2.0 - DEFAULT_A * 100),  # one size: its mean, default slope
    ([(100, 0.3), (300, 0.7)], 0.002, 0.1),                        # an exact line
    ([(100, 0.5), (200, 0.4)], 0.0, 0.45),                         # a falling fit: never a negative slope
    ([(1000, 0.1), (2000, 0.2)], 0.0001, 0.0),
    ([(10, 0.0), (20, 0.0), (30, 5.0)], 150 / 1400, 0.0),          # would cross below 0: through the origin
    ([(94, 0.45), (95, 0.60)], DEFAULT_A, 0.525 - DEFAULT_A * 94.5),  # nearly one size: no slope from noise
])
def test_the_fit(samples, a, b0):
    got_a, got_b0 = fit(samples)
    assert got_a == pytest.approx(a) and got_b0 == pytest.approx(b0, abs=1e-9)


def test_estimates_follow_what_was_measured_and_keep_the_latest():
    cost = MigrationCost(max_samples=2)
    assert cost.estimate(100) == pytest.approx(DEFAULT_A * 100 + DEFAULT_B0)
    cost.observe(100, 9.0)          # pushed out by the next two
    cost.observe(100, 0.3)
    cost.observe(300, 0.7)
    assert cost.estimate(500) == pytest.approx(0.002 * 500 + 0.1)
    assert cost.to_dict() == {"a_s_per_token": pytest.approx(0.002), "b0_s": pytest.approx(0.1), "samples": 2}
    cost.observe(0, 1.0)            # nothing moved: not a sample
    cost.observe(10, -1.0)
    assert cost.to_dict()["samples"] == 2


def test_before_migrations_fit_a_slope_it_is_the_nodes_measured_prefill_rate():
    from sllmd.cluster.locality import ServiceTimes
    times = ServiceTimes()
    times.observe_request("m", {"total_s": 1.0, "prompt_tokens": 4, "prefill_s": 0.4})     # too short to time
    assert times.prefill_s_per_token() is None
    times.observe_request("m", {"total_s": 1.0, "prompt_tokens": 200, "prefill_s": 0.1})
    times.observe_request("m", {"total_s": 1.0, "prompt_tokens": 200, "prefill_s": 0.5, "resumed_at": 9})  # not a prompt
    assert times.prefill_s_per_token() == pytest.approx(0.0005)
    cost = MigrationCost()
    assert cost.to_dict(default_a=times.prefill_s_per_token())["a_s_per_token"] == pytest.approx(0.0005)
    cost.observe(100, 0.3)
    assert cost.estimate(100, default_a=0.0005) == pytest.approx(0.3)   # one size: the slope stays, b0 takes the rest
