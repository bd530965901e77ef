"""`python -m search.bench embedding`: one row per engine and CPU allocator, each measured in its own process."""
from search.bench.__main__ import main as bench_main


def test_the_embedding_benchmark_prints_a_row_per_engine_and_allocator_with_rate_and_kernel_time(capsys):
    assert bench_main(["embedding", "--image-size", "64", "--images", "256"]) == 0
    printed = capsys.readouterr().out
    assert "GFLOP/s float32 matmul" in printed and "efficientnet_lite0 at 64 px, 256 random photos" in printed
    rows = [line for line in printed.splitlines() if line.startswith(("| tensorflow, default", "| tensorflow, BFC",
                                                                      "| LiteRT"))]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        rate, seconds, user, kernel, faults = (float(c) for c in cells[1:])
        assert rate > 0 and seconds > 0 and user > 0 and kernel >= 0 and faults >= 0
        assert abs(rate * seconds - 256) < 0.01 * rate + 3  # timed photos over timed seconds (shown to 0.01 s)


def test_a_failing_row_is_an_error_naming_it(capsys):
    assert bench_main(["embedding", "--image-size", "64", "--images", "64", "--backbone", "nosuch"]) == 1
    assert "the process of the row 'tensorflow, default allocator' failed" in capsys.readouterr().err
