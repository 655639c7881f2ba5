"""The documentation's speed page is the benchmark's JSON rendered (benchmarks/speed_page.py), never typed by hand."""

from benchmarks.speed_page import PAGE, RESULTS, render, render_report


def test_the_committed_speed_page_is_the_results_rendered():
    """After benchmarks/run_results.sh (or any new JSON in benchmarks/results/), rerun benchmarks/speed_page.py."""
    assert PAGE.read_text() == render(RESULTS)


def test_accuracy_by_dtype_renders_with_its_machine_and_command():
    from benchmarks.timing import machine_description, machine_state

    row = dict(model="repmlp_fmnist_mlp", form="deploy", top1=92.49, top5=99.89, count=10000)
    report = dict(
        command="python tools/eval.py --dtype bf16",
        machine={**machine_description(), "start": machine_state()},
        accuracy=[{**row, "dtype": "fp32"}, {**row, "dtype": "bf16"}],
    )
    section = render_report("top1", report)
    assert "| repmlp_fmnist_mlp | deploy | bf16 | 92.49 | 99.89 | 10000 |" in section
    assert "python tools/eval.py --dtype bf16" in section and "; lacks " in section
