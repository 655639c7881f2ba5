"""The documentation's speed page is the benchmark's JSON rendered (benchmarks/speed_page.py), never typed by hand."""

from benchmarks.speed_page import PAGE, RESULTS, render


def test_the_committed_speed_page_is_the_results_rendered():
    """After benchmarks/run_results.sh (or any new JSON in benchmarks/results/), rerun benchmarks/speed_page.py."""
    assert PAGE.read_text() == render(RESULTS)
