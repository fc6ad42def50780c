"""The bench's final lines: today's fields kept, the warm and compiled-warm modes' fields added (bench/suite.py
ModelResult)."""

from __future__ import annotations

from bench.suite import Measurement, ModelResult


def _run(ceiling: float, bulklabel: float, warm: float | None) -> dict[str, Measurement]:
    run = {"ceiling": Measurement(ceiling, 100.0), "raydata": Measurement(20.0, 200.0),
           "bulklabel": Measurement(bulklabel, 300.0, first_commit_s=6.0)}  # fmt: skip
    if warm is not None:
        run["warm"] = Measurement(warm, 400.0, first_commit_s=2.0, service_mib=1500.0)
    return run


def test_line_without_warm_is_unchanged():
    result = ModelResult("mobilenet_v2", [_run(100.0, 60.0, None)])
    assert result.line() == ("mobilenet_v2: bulklabel=60.0 raydata=20.0 ceiling=100.0 vs_raydata=3.00 vs_ceiling=0.60")
    assert "warm" not in result.memory_line()


def test_warm_fields_are_medians_of_within_run_ratios():
    # Ratios within each run (0.90, 0.80, 0.70): the median is 0.80, not the ratio of the median rates.
    result = ModelResult("resnet50", [_run(20.0, 15.0, 18.0), _run(30.0, 20.0, 24.0), _run(10.0, 6.0, 7.0)])
    line = result.line()
    assert line.startswith("resnet50: bulklabel=15.0 raydata=20.0 ceiling=20.0 vs_raydata=0.75 vs_ceiling=0.67")
    assert line.endswith(" warm=18.0 warm_vs_ceiling=0.80")
    warm = result.warm_line()
    assert "warm=18.0 cold=15.0 ceiling=20.0" in warm
    assert "first committed shard warm=2.0s cold=6.0s" in warm and "1500 MiB" in warm
    assert "warm=400" in result.memory_line()


def test_compiled_warm_fields_follow_the_warm_ones_against_the_same_ceiling():
    runs = []
    for ceiling, compiled in ((20.0, 30.0), (30.0, 36.0), (10.0, 14.0)):  # within-run ratios 1.5, 1.2, 1.4
        run = _run(ceiling, 15.0, 18.0)
        run["compiled_warm"] = Measurement(compiled, 500.0, first_commit_s=2.0, service_mib=1600.0)
        runs.append(run)
    line = ModelResult("resnet50", runs).line()
    assert " warm=18.0 warm_vs_ceiling=" in line
    assert line.endswith(" compiled_warm=30.0 compiled_warm_vs_ceiling=1.40")
    assert line.index(" warm=") < line.index(" compiled_warm=")
    assert "compiled_warm=500" in ModelResult("resnet50", runs).memory_line()
