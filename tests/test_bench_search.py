"""`python -m search.bench search`: every arm runs on real CIFAR-10 with a tiny budget, and the table, the
curves and the plot come from every arm saved under --out."""
import csv
import json
import math
import re
from datetime import datetime, timedelta

import pytest

from search.bench import search as bench
from search.bench.__main__ import main as bench_main

# a study arm and a single training ("random" is the search arm with other SearchConfig settings, SEARCH_ARMS;
# "default" and "baseline" single trainings like the reference's): each arm costs its budget and ~10 s of set-up
ARMS = ("search", "reference")
BUDGET = 20  # seconds per arm


def table_rows(printed: str) -> dict[str, list[str]]:
    """{arm: cells} of the printed table's body rows."""
    rows = {}
    for line in printed.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ARMS:
            rows[cells[0]] = cells[1:]
    return rows


def read_curve(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def benchmark(cifar_dir, tmp_path_factory):
    """One run of all four arms, through the dispatcher as `python -m search.bench search` does."""
    out = tmp_path_factory.mktemp("bench-search")
    capture = pytest.MonkeyPatch()
    import io
    import sys

    printed = io.StringIO()
    capture.setattr(sys, "stdout", printed)
    try:
        code = bench_main(["search", "--dataset", "cifar10", "--data-dir", str(cifar_dir), "--subset", "300",
                           "--budget", str(BUDGET), "--arms", ",".join(ARMS), "--out", str(out)])
    finally:
        capture.undo()
    sys.stdout.write(printed.getvalue())
    return code, out, printed.getvalue()


@pytest.mark.slow
def test_every_arm_runs_and_saves_its_curve_facts_table_and_plot(benchmark):
    code, out, printed = benchmark
    assert code == 0
    assert printed.count("GFLOP/s float32 matmul") >= 1 + len(ARMS)  # once first, then before each arm
    for arm in ARMS:
        rows = read_curve(out / f"{arm}.csv")
        assert rows, f"{arm}: empty curve"
        elapsed = [float(r["elapsed_seconds"]) for r in rows]
        best_val = [float(r["best_val_accuracy"]) for r in rows]
        assert elapsed == sorted(elapsed) and best_val == sorted(best_val)
        # a screen (an explored trial of the search arms' refitting runs) has no test figure; the models have one
        assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 or math.isnan(float(r["test_accuracy"])) for r in rows)
        assert 0.0 <= float(rows[-1]["test_accuracy"]) <= 1.0
        facts = json.loads((out / f"{arm}.json").read_text())
        assert facts["machine_gflops"] > 0 and facts["images_per_second"] > 0 and facts["train_gflops"] > 0
        assert facts["budget"] == BUDGET and facts["subset"] == 300
    # the single training fits the budget: epochs from the timed first one, the last one ending near the budget
    reference = json.loads((out / "reference.json").read_text())
    assert float(read_curve(out / "reference.csv")[-1]["elapsed_seconds"]) <= BUDGET * 1.5
    # the timed one, then the rest (on a slow CPU under load the timed one may take the whole budget)
    assert reference["epochs"] >= 1 and 1 <= reference["epochs_run"] <= reference["epochs"] + 1
    assert reference["params"]["architecture"] == "reference_cifar" and reference["params"]["optimizer"] == "adamw"
    assert json.loads((out / "search.json").read_text())["study"].startswith("bench-search-search-")
    table = table_rows(printed)
    assert list(table) == list(ARMS)
    assert all(len(cells) == 5 + 4 for cells in table.values())  # 5 checkpoints, best val, 3 rates
    assert "noise" in printed  # one run per arm is said to be noisy beside the table
    plot = out / bench.PLOT_NAME
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_running_one_arm_again_redraws_the_table_from_every_saved_arm(benchmark, cifar_dir, capsys):
    _, out, _ = benchmark
    search_curve = (out / "search.csv").read_text()
    (out / bench.PLOT_NAME).unlink()
    code = bench.main(["--dataset", "cifar10", "--data-dir", str(cifar_dir), "--subset", "300",
                       "--budget", str(BUDGET // 2), "--arms", "reference", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert re.findall(r"^== (\w+):", printed, re.M) == ["reference"]  # only the reference ran
    assert (out / "search.csv").read_text() == search_curve  # the saved arm untouched
    assert json.loads((out / "reference.json").read_text())["budget"] == BUDGET // 2
    table = table_rows(printed)
    assert list(table) == list(ARMS)  # every saved arm, not just the one that ran
    # checkpoints follow the longest budget; the reference, run for half of it, has no value at the end
    assert f"test @ {bench.minutes(BUDGET)}" in printed and table["reference"][4] == "-"
    # the search, run for the full budget, shows at the end what its curve had by then (nothing yet on a slow machine)
    by_the_end = [r for r in read_curve(out / "search.csv") if float(r["elapsed_seconds"]) <= BUDGET]
    tested = by_the_end and by_the_end[-1]["test_accuracy"] != "nan"  # a screen leading has no test figure
    assert table["search"][4] == (by_the_end[-1]["test_accuracy"] if tested else "-")
    assert "different budgets" in printed
    assert (out / bench.PLOT_NAME).is_file()


def frozen(number, val, test, started, seconds):
    import optuna
    from optuna.distributions import FloatDistribution

    return optuna.trial.FrozenTrial(
        number=number, state=optuna.trial.TrialState.COMPLETE, value=val, values=None,
        datetime_start=started, datetime_complete=started + timedelta(seconds=seconds),
        params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}, user_attrs={"test_accuracy": test},
        system_attrs={}, intermediate_values={}, trial_id=number)


def test_a_search_curve_follows_the_best_validation_never_the_best_test():
    t0 = datetime(2026, 1, 1, 12, 0, 0)
    trials = [frozen(0, 0.50, 0.90, t0, 10),                        # best test, but not best val later
              frozen(1, 0.60, 0.40, t0 + timedelta(seconds=10), 10),
              frozen(2, 0.55, 0.99, t0 + timedelta(seconds=20), 10)]
    assert bench.study_curve(trials) == [(10.0, 0.50, 0.90), (20.0, 0.60, 0.40), (30.0, 0.60, 0.40)]
    assert bench.value_at(bench.study_curve(trials), 25) == 0.40
    assert bench.value_at(bench.study_curve(trials), 5) is None


def test_a_screen_in_the_search_curve_has_no_test_figure_until_a_tested_model_leads():
    t0 = datetime(2026, 1, 1, 12, 0, 0)
    trials = [frozen(0, 0.50, None, t0, 10),                        # a screen: its run answered no test split
              frozen(1, 0.70, 0.68, t0 + timedelta(seconds=10), 10)]  # a refit round, tested
    curve = bench.study_curve(trials)
    assert math.isnan(curve[0][2]) and curve[1] == (20.0, 0.70, 0.68)
    assert bench.value_at(curve, 15) is None and bench.value_at(curve, 25) == 0.68  # the table prints "-", then 68%


def test_checkpoints_are_the_issues_minutes_at_full_budget():
    assert [s / 60 for s in bench.checkpoints(3600, "cifar10")] == pytest.approx([10, 20, 30, 45, 60])
    assert [s / 60 for s in bench.checkpoints(5400, "stanford_dogs")] == pytest.approx([45, 90])


def test_forward_flops_count_convolution_and_dense_multiply_adds():
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)             # 8*8 positions x 3*3*3 x 4
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)                                      # 4*4*4 = 64
    outputs = keras.layers.Dense(10)(x)                                # 64 x 10
    model = keras.Model(inputs, outputs)
    assert bench.forward_flops(model) == 2 * (8 * 8 * 27 * 4 + 64 * 10)


def test_a_reference_the_space_cannot_express_stops_before_any_arm_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.REFERENCE, "cifar10", {**bench.REFERENCE["cifar10"], "architecture": "no_such"})
    code = bench.main(["--dataset", "cifar10", "--budget", "5", "--arms", "search,reference",
                       "--out", str(tmp_path)])
    assert code == 2
    assert "no_such" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.csv"))  # the search arm never started


def test_an_ensemble_enters_the_search_curve_when_built_and_only_while_its_validation_is_the_best(tmp_path):
    from mlflow import MlflowClient

    from search.stores import tracking_uri

    t0 = datetime(2026, 1, 1, 12, 0, 0)
    trials = [frozen(0, 0.50, 0.48, t0, 10), frozen(1, 0.60, 0.58, t0 + timedelta(seconds=10), 10),
              frozen(2, 0.70, 0.66, t0 + timedelta(seconds=20), 20)]
    assert bench.ensemble_runs("study-a", tmp_path) == []  # no store, no ensemble
    client = MlflowClient(tracking_uri(None, tmp_path))
    experiment = client.create_experiment("study-a")

    def run(role, seconds, val=None, test=None):
        started = client.create_run(experiment, tags={"search.role": role})
        if val is not None:
            client.log_metric(started.info.run_id, "val_accuracy", val)
            client.log_metric(started.info.run_id, "test_accuracy", test)
        client.set_terminated(started.info.run_id, end_time=int((t0 + timedelta(seconds=seconds)).timestamp() * 1000))

    run("trial", 20)
    assert bench.ensemble_runs("study-a", tmp_path) == []  # trials only
    run("ensemble", 25, 0.65, 0.61)  # built when a worker restarted for memory: the best until trial 2 ends
    run("ensemble", 45, 0.72, 0.69)  # at the run's end
    curve = bench.study_curve(trials, bench.ensemble_runs("study-a", tmp_path))
    assert curve == [(10.0, 0.50, 0.48), (20.0, 0.60, 0.58), (25.0, 0.65, 0.61), (40.0, 0.70, 0.66),
                     (45.0, 0.72, 0.69)]
