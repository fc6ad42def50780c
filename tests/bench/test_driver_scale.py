"""bench/driver_scale.py: its phase timer wraps the runner's own functions and puts them back; the growth line."""

from __future__ import annotations

import time

from bench.driver_scale import DriverPoint, PhaseTimer, _growth


def test_the_phase_timer_times_the_wrapped_functions_and_restores_them(monkeypatch):
    import jobs.label.runner as runner
    from jobs.output.session import OutputSession

    original_check, original_plan = OutputSession.check, runner._check_plan
    monkeypatch.setattr(runner, "_check_plan", lambda *args: time.sleep(0.05) or "planned")
    stand_in = runner._check_plan
    timer = PhaseTimer()
    with timer.installed():
        assert runner._check_plan is not stand_in and OutputSession.check is not original_check
        assert runner._check_plan("spec", "committed") == "planned"
        runner._check_plan("spec", "committed")
    assert runner._check_plan is stand_in and OutputSession.check is original_check
    taken = timer.take()
    assert 0.1 <= taken["listing"] < 1.0 and "check" not in taken
    assert timer.take() == {}
    assert original_plan is not stand_in


def test_growth_compares_per_shard_figures_of_the_largest_size_with_the_smallest():
    def point(shards: int, cpu: float) -> DriverPoint:
        return DriverPoint(shards, 1.0, cpu, shards / 100, {"listing": shards / 1000, "complete": 1.0}, 0.1,
                           {"check": shards / 500})  # fmt: skip

    (line,) = _growth([point(10_000, 40.0), point(100_000, 800.0)])
    assert "cpu=2.00" in line and "rss=1.00" in line and "listing=1.00" in line and "check_on_rerun=1.00" in line
    assert "complete=0.10" in line
    assert _growth([point(10, 1.0)]) == []
