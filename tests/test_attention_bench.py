"""The attention and scaling benchmarks run end to end on tiny sizes (numbers not asserted)."""

import json

import pytest
import torch

from flowar.bench import attention as ab
from flowar.bench import scaling as sb
from flowar.bench.attention import pyramid_layout
from flowar.bench.common import loglog_slope
from flowar.errors import UserError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine run far faster without thread spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n", [2, 5, 256, 1000, 16384])
def test_pyramid_layout_covers_the_tokens_with_growing_blocks(n):
    lengths = pyramid_layout(n).lengths
    assert sum(lengths) == n
    assert lengths[-1] >= 3 * n // 4 or n <= 4
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))


def test_loglog_slope():
    assert loglog_slope([1, 2, 4], [3, 48, 768]) == pytest.approx(4.0)


def test_attention_timings_report_error_within_the_bound():
    cfg = ab.AttentionBenchConfig(tokens=(64, 128), repeats=1)
    rows = ab.time_backends(cfg)
    assert {(r.backend, r.tokens) for r in rows} == {
        (b, n) for b in ("exact", "poly", "performer") for n in (64, 128)
    }
    for r in rows:
        assert r.seconds > 0 and r.gflop > 0
        if r.backend == "poly":
            assert r.rank == 153 and r.error <= r.bound
        if r.backend == "exact":
            assert r.error == 0


def test_error_sweeps_respect_the_bound_and_break_at_large_beta():
    rows = ab.error_vs_beta((0.25, 16.0), tokens=64)
    assert all(r.error <= r.bound for r in rows)
    worst = max(r.error for r in rows if r.beta == 16.0)
    assert worst > 0.3  # the method breaks when entries are unbounded
    flat = ab.error_vs_tokens((64, 256), degree=4)
    assert all(r.error <= r.bound for r in flat)


def test_scaling_reports_slopes_and_a_smaller_poly_cache():
    report = sb.run(sb.ScalingBenchConfig(sides=(2, 4), fit_sides=(2, 4), count_flops=False))
    assert set(report.time_slopes) == {"exact", "poly"}
    assert [r.tokens for r in report.rows if r.backend == "poly"] == [5, 21]
    poly = {r.side: r.cache_mib for r in report.rows if r.backend == "poly"}
    assert poly[2] == poly[4]  # constant-size state
    assert all(r.max_bound is not None for r in report.rows if r.backend == "poly")


def test_scaling_rejects_bad_sides():
    with pytest.raises(UserError, match="powers of two"):
        sb.ScalingBenchConfig(sides=(3, 5))


@pytest.mark.slow
def test_bench_clis_write_json_and_plots(tmp_path):
    from flowar.cli.main import main

    out = tmp_path / "res"
    assert main(["bench", "attention", "--tokens", "64,128", "--repeats", "1", "--out",
                 str(out), "--json", str(out / "a.json")]) == 0
    assert json.loads((out / "a.json").read_text())["timings"]
    for name in ("attention_time", "error_vs_tokens", "error_vs_beta"):
        assert (out / f"{name}.png").stat().st_size > 0
    assert main(["bench", "scaling", "--sides", "2,4", "--fit", "2,4", "--out", str(out),
                 "--json", str(out / "s.json")]) == 0
    data = json.loads((out / "s.json").read_text())
    assert data["cache_ratio"] > 0 and data["rows"][0]["total_gflop"] > 0
    assert (out / "scaling_time.png").exists() and (out / "scaling_flops.png").exists()
    assert main(["bench", "scaling", "--sides", "3,5"]) == 2
