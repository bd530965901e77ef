"""The refit phase of a time-budgeted search: explore for part of --timeout, then retrain the best configuration
for the rest of it, as one more trial recorded like every other (or two: a round ending at half the budget, then a
warm restart from its weights)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from search.config import SearchConfig
from search.errors import ConfigError
from search.results import leaderboard
from search.drivers import run_search
from search.sampling import parse_objectives, refit_fraction
from conftest import ROOT, write_space, TINY_SPACE


def command(*args, cwd):
    """`python -m ARGS` as a user types it, from cwd."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_a_timed_search_retrains_its_best_for_the_rest_a_round_by_half_the_budget_then_a_warm_restart(
        cifar_dir, workdir, tiny_space):
    # (a refit that starts after half the budget is one round: test_the_refit_rounds_end_the_first_at_half_the_budget)
    # exploration's 15 s hold several trials (MIN_EXPLORED_TRIALS) also on a slow CPU
    done = command("search.run", "--space", str(tiny_space), "--data-dir", str(cifar_dir), "--trials", "100",
                   "--timeout", "60", "--refit", "0.75", "--sampler", "random", cwd=workdir.parent)
    assert done.returncode == 0, done.stderr

    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{workdir}/optuna.db")
    refits = [t for t in study.trials if t.user_attrs.get("source") == "refit"]
    second = next(t for t in refits if t.user_attrs["refit_round"] == 2)
    first = next(t for t in refits if t.number == second.user_attrs["continues"])
    raced = [t for t in refits if t.user_attrs.get("race")]
    best = max((t for t in study.trials if t.state == TrialState.COMPLETE and t.user_attrs.get("refit_of") is None),
               key=lambda t: t.value)
    if best.user_attrs.get("source") == "default":  # exploration found nothing better: no race
        assert not raced and len(refits) == 2
    else:  # round 1 raced the best against the default; the more accurate on validation went on
        default = next(t for t in study.trials if t.user_attrs.get("source") == "default")
        assert sorted(t.user_attrs["refit_of"] for t in raced) == sorted([best.number, default.number])
        assert first.value == max(t.value for t in raced) and f"wins the race" in done.stdout
    assert first.state == second.state == TrialState.COMPLETE
    assert [first.user_attrs["refit_round"], second.user_attrs["refit_round"]] == [1, 2]
    # the final line counts explored trials against --trials and the refit's rounds apart
    explored = sum(1 for t in study.trials if t.user_attrs.get("refit_of") is None
                   and t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    assert f"study tiny-cifar10: {explored} of 100 trials and {len(refits)} refit rounds (this run: " in done.stdout
    assert second.params == first.params and second.user_attrs["refit_of"] == first.user_attrs["refit_of"]
    assert second.user_attrs["continues"] == first.number
    assert second.user_attrs["epochs_before"] == first.user_attrs["epochs_run"]
    best_explored = next(t for t in study.trials if t.number == first.user_attrs["refit_of"])
    assert first.params == best_explored.params and first.user_attrs["epochs"] > best_explored.user_attrs["epochs_run"]
    assert f"; {first.user_attrs['epochs']} scheduled, the schedule ending with the last that fits" in done.stdout
    assert f"round 2 of 2: trial {first.user_attrs['refit_of']}'s configuration" in done.stdout
    assert f"starting from trial {first.number}'s weights" in done.stdout
    # the first round ended by half the budget: a finished model exists at 30 of the 60 s; the second's training
    # stopped by the end of the budget, which began before the first trial
    started = min(t.datetime_start for t in study.trials)
    assert (first.datetime_complete - started).total_seconds() <= 30 + 3
    assert started.timestamp() < second.user_attrs["deadline"] <= started.timestamp() + 60

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    for refit in (first, second):  # never pruned; early stopping's patience is its epochs: the schedule runs to its
        refit_run = client.get_run(refit.user_attrs["mlflow_run_id"])  # end unless the budget ends first
        assert refit_run.data.tags["search.refit"] == "true"
        assert refit_run.data.tags["search.refit_of"] == str(refit.user_attrs["refit_of"])
        epochs_logged = len(client.get_metric_history(refit_run.info.run_id, "val_accuracy"))
        assert epochs_logged == refit.user_attrs["epochs"] or "another would end past the time budget" in done.stdout
    parent = client.get_run(refit_run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["search.refit_of"] == str(second.user_attrs["refit_of"])
    # a time-budgeted run measured the machine first and logged it on its parent run; this one could explore
    assert parent.data.metrics["machine_matmul_gflops"] > 1 and parent.data.metrics["machine_images_per_second"] > 1
    assert parent.data.metrics["machine_mflops_per_image"] > 0 and parent.data.tags["search.precision"]
    assert "search.exploration" not in parent.data.tags
    table = leaderboard(["tiny-cifar10"], workdir=str(workdir))
    assert set(table.loc[table["trial"].isin([first.number, second.number]), "source"]) == {"refit"}
    # the refit competes as a trial: the best model is whichever has the higher validation accuracy
    assert int(parent.data.tags["search.best_trial"]) == study.best_trial.number

    # every kept refit round is an ensemble candidate: its validation and test answers saved beside it, at its input
    # size; kept explored trials are screens, without answers
    models = workdir / "models" / "tiny-cifar10"
    rounds = [models / f"trial-{t.number}.keras" for t in refits if (models / f"trial-{t.number}.keras").is_file()]
    assert len(rounds) >= 2
    assert not any((models / f"trial-{t.number}.predictions.npz").exists() for t in study.trials
                   if t.user_attrs.get("refit_of") is None and t.number != study.best_trial.number)
    for path in rounds:
        saved = np.load(path.with_suffix(".predictions.npz"))
        assert saved["val"].shape[1] == saved["test"].shape[1] == 10 and int(saved["size"]) == 32
        assert np.allclose(saved["val"].sum(axis=1), 1, atol=1e-3)
    # the registered model is the ensemble of the rounds (and explored trials) when it beats the best on validation
    version = max(client.search_model_versions("name = 'tiny-cifar10-best'"), key=lambda v: int(v.version))
    ensembles = client.search_runs([client.get_experiment_by_name("tiny-cifar10").experiment_id],
                                   "tags.`search.role` = 'ensemble'")
    if ensembles:
        assert version.tags["search.trial"].startswith("ensemble") and "ensemble of trials" in done.stdout
        assert ensembles[0].data.metrics["val_accuracy"] > ensembles[0].data.metrics["best_single_val_accuracy"]
    else:
        assert version.tags["search.trial"] == str(study.best_trial.number)


def test_a_second_round_starts_from_the_first_rounds_weights(cifar_dir, tmp_path):
    from runners import scratch_cnn
    from runners.datasets import load_dataset
    from search import space as spaces

    space = spaces.load_space(str(write_space(tmp_path, TINY_SPACE)))
    params = {**spaces.default_params(space), "batch_norm": False}
    data = load_dataset("cifar10", data_dir=str(cifar_dir), image_size=32, subset=300)
    run = dict(epochs=2, patience=2, seed=0, recipes=space.recipes, evaluate_test=False)
    first = scratch_cnn.train_and_evaluate(params, data, **run)
    first.model.save(tmp_path / "first.keras")
    x_val = data.splits["val"][0].astype("float32")

    still = {**params, "learning_rate": 1e-9}  # training that cannot move the weights
    resumed = scratch_cnn.train_and_evaluate(still, data, **{**run, "epochs": 1},
                                             options={"initial_weights": str(tmp_path / "first.keras")})
    fresh = scratch_cnn.train_and_evaluate(still, data, **{**run, "epochs": 1})

    before = first.model.predict(x_val, verbose=0)
    np.testing.assert_allclose(resumed.model.predict(x_val, verbose=0), before, atol=1e-4)
    assert np.abs(fresh.model.predict(x_val, verbose=0) - before).max() > 0.05


def test_training_stops_after_the_epoch_that_reaches_its_deadline(cifar_dir, tmp_path):
    from runners import scratch_cnn
    from runners.datasets import load_dataset
    from runners.callbacks import Deadline, checkpoint_state
    from search import space as spaces

    space = spaces.load_space(str(write_space(tmp_path, TINY_SPACE)))
    data = load_dataset("cifar10", data_dir=str(cifar_dir), image_size=32, subset=300)
    run = dict(epochs=3, patience=3, seed=0, recipes=space.recipes, evaluate_test=False)

    passed, far = Deadline(time.time()), Deadline(time.time() + 3600)
    stopped = scratch_cnn.train_and_evaluate(spaces.default_params(space), data, callbacks=[passed],
                                             checkpoint=tmp_path / "checkpoint", **run)
    finished = scratch_cnn.train_and_evaluate(spaces.default_params(space), data, callbacks=[far], **run)

    assert stopped.epochs_run == 1 and passed.stopped_at_epoch == 1
    assert finished.epochs_run == 3 and far.stopped_at_epoch is None
    # the checkpoint knows the fit stopped: a process resuming it (killed during the test pass) trains no further
    assert checkpoint_state(tmp_path / "checkpoint")["stopped"] is True


def test_the_refit_rounds_end_the_first_at_half_the_budget_when_the_refit_starts_before_it():
    from search.refit import refit_rounds

    best = optuna.trial.create_trial(value=0.6, user_attrs={"epochs_run": 4, "epoch_seconds": 100.0,
                                                            "train_seconds": 400.0, "trial_seconds": 420.0})
    assert refit_rounds(best, timeout=3600, elapsed=900, remaining=2700) == [900, 1800]
    assert refit_rounds(best, timeout=3600, elapsed=1800, remaining=1800) == [1800]   # starts at the half
    assert refit_rounds(best, timeout=3600, elapsed=1500, remaining=2100) == [2100]   # 4 epochs do not fit in 300 s
    assert refit_rounds(best, timeout=3600, elapsed=300, remaining=1600) == [1600]    # a second round shorter than the first


@pytest.mark.slow
def test_a_process_over_its_memory_limit_restarts_keeps_the_time_budget_and_still_refits(cifar_dir, workdir,
                                                                                          tiny_space):
    import time

    started = time.monotonic()
    done = command("search.run", "--space", str(tiny_space), "--data-dir", str(cifar_dir), "--trials", "1000",
                   "--timeout", "80", "--refit", "0.6", "--max-memory-growth", "0.001", cwd=workdir.parent)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("restarting with a fresh process") >= 1
    # a restarted process that began the budget anew would explore, grow and restart until --trials ran out
    # (a restart costs seconds of imports and loading, more on a busy machine: the refit needs the 48 s left;
    # the 32 s of exploration let two trials end, the first to measure memory, on a loaded AVX2 machine too)
    assert elapsed < 170, f"{elapsed:.0f} s for an 80 s budget"
    study = optuna.load_study(study_name="tiny-cifar10", storage=f"sqlite:///{workdir}/optuna.db")
    assert [t.state for t in study.trials if t.user_attrs.get("source") == "refit"][:1] == [TrialState.COMPLETE]
    # every process has its invocation run, and the ones replaced say why they stopped
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny-cifar10").experiment_id
    parents = client.search_runs([experiment], "tags.`search.role` = 'invocation'")
    assert len(parents) >= 2 and any(p.data.tags.get("search.stopped") == "memory" for p in parents)


def test_a_race_runs_only_where_round_one_holds_a_refit_of_each_contender():
    from search.refit import race_fits

    def explored(epoch_seconds):  # 4 epochs explored, 10 s of set-up and evaluation besides
        return optuna.trial.create_trial(value=0.5, user_attrs={"epochs_run": 4, "epoch_seconds": epoch_seconds,
                                                                "train_seconds": 4 * epoch_seconds,
                                                                "trial_seconds": 4 * epoch_seconds + 10})

    # the README command on AVX2 (2026-12-06): round 1's ~138 s for two configurations of ~30 s epochs; each
    # share of 69 s holds neither refit of 4 epochs, and the race left no model: no race there
    best, default = explored(30.0 / 1.05), explored(29.0 / 1.05)
    assert not race_fits([best, default], 138)
    assert race_fits([best, default], 2 * (10 + 4 * 30.0) + 1)
    assert not race_fits([best, explored(60.0)], 2 * (10 + 4 * 30.0) + 1)  # the slower one does not fit


def test_a_refit_fraction_above_0_9_exits_2_with_a_message(tmp_path):
    done = command("search.run", "--refit", "0.95", "--timeout", "60", cwd=tmp_path)
    assert done.returncode == 2
    assert "--refit 0.95: give a fraction of --timeout between 0 and 0.9" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_multi_objective_study_refuses_a_refit_and_auto_leaves_it_off(tmp_path):
    space = write_space(tmp_path, TINY_SPACE)
    done = command("search.run", "--space", str(space), "--timeout", "60", "--refit", "0.4",
                   "--objectives", "val_accuracy,params", cwd=tmp_path)
    assert done.returncode == 2 and "multi-objective" in done.stderr and "Traceback" not in done.stderr
    pareto = SearchConfig(objectives="val_accuracy,params")
    assert refit_fraction(pareto, 60, parse_objectives(pareto.objectives)) == 0
    assert refit_fraction(SearchConfig(), 60, ["val_accuracy"]) == 0.8  # auto with a time budget
    assert refit_fraction(SearchConfig(), None, ["val_accuracy"]) == 0  # ... and without one


def test_the_keras_tuner_driver_refuses_a_refit(cifar_dir, workdir, tiny_space):
    with pytest.raises(ConfigError, match="Keras Tuner driver has no refit"):
        run_search(SearchConfig(space=str(tiny_space), data_dir=str(cifar_dir), driver="kerastuner", refit=0.4))


def test_a_refit_is_skipped_when_not_even_one_epoch_fits_in_the_time_left():
    from search.refit import one_epoch_fits

    # a slow machine: exploration's one trial overran, 500 s are left and an epoch takes 780 s
    best = optuna.trial.create_trial(value=0.8, user_attrs={"epochs_run": 4, "epoch_seconds": 780.0,
                                                            "train_seconds": 3120.0, "trial_seconds": 3170.0})
    assert not one_epoch_fits(best, remaining=500)
    assert one_epoch_fits(best, remaining=1500)


def test_the_refit_fills_the_time_left_with_epochs_of_the_best_trials_measured_length():
    from search.refit import refit_plan

    best = optuna.trial.create_trial(value=0.6, user_attrs={"epochs_run": 2, "epoch_seconds": 10.0,
                                                            "train_seconds": 21.0, "trial_seconds": 26.0})
    # 5 s of building and testing, then 9 epochs planned at 10 s plus the 5% margin (10 would need 110 s)
    assert refit_plan(best, remaining=100) == (9, 99.5)
    assert refit_plan(best, remaining=15) == (2, 26.0)   # never fewer epochs than the best trial ran


def test_a_run_sized_by_its_own_flags_ignores_the_space_time_budget_and_does_not_refit(tmp_path):
    from search.setup import resolve_space

    space = write_space(tmp_path, TINY_SPACE.replace("subset: 300}", "subset: 300, timeout: 600}"))
    budget = lambda **flags: resolve_space(SearchConfig(space=str(space), **flags))[2]  # noqa: E731
    assert budget().timeout == 600                             # the space's budget, refit included
    assert budget(trials=2, epochs=1).timeout is None          # a short run: no time budget, no refit
    assert budget(epochs=1).timeout is None and budget(trials=2).timeout is None
    assert budget(trials=2, timeout=30).timeout == 30          # an explicit --timeout still holds
    assert refit_fraction(SearchConfig(), budget(trials=2, epochs=1).timeout, ["val_accuracy"]) == 0.0


def test_the_progress_line_never_counts_past_the_target_and_its_best_moves():
    import logging

    from runners.callbacks import Progress

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("search")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        Progress(2, position=3, target=2, epochs=2, best=0.10).on_epoch_end(
            0, {"val_accuracy": 0.21, "loss": 1.0, "accuracy": 0.2})
        Progress(5, position=9, target=2, epochs=4, best=0.3, where="refit round 1").on_epoch_end(
            0, {"val_accuracy": 0.2})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert "(2 of 2)" in lines[0] and "best so far 0.2100" in lines[0]
    assert "trial 5 (refit round 1) epoch 1/4" in lines[1] and "best so far 0.3000" in lines[1]


def test_on_a_machine_too_slow_to_explore_the_default_trains_for_the_whole_budget(cifar_dir, tmp_path, monkeypatch):
    from search import plan

    real_measure = plan.measure

    def slow_machine(setup, params):  # timed steps as a 2-core laptop without bfloat16 would time them
        _, sizes = real_measure(setup, params)
        rate = {1.0: 14.0, 0.5: 20.0}[params["width"]]  # images/s: epochs of (300 + 300 / 3) images in 30 and 21 s
        return {"images_per_second": rate, "mflops_per_image": 268 * params["width"] ** 2, "train_gflops": 4.0}, sizes

    monkeypatch.setattr(plan, "measure", slow_machine)
    space = write_space(tmp_path, TINY_SPACE.replace(
        "  pooling:", "  width: {type: categorical, choices: [0.5, 1.0], default: 1.0}\n  pooling:"))
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), workdir=str(tmp_path / "mlruns"),
                                      timeout=60, trials=3, epochs=1))
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    ran = [t for t in study.trials if t.state != TrialState.WAITING]
    # the refit's 48 s hold fewer than REFIT_MIN_EPOCHS epochs at either width: the narrowest is this run's default;
    # exploration's 12 s cannot hold one 31 s trial of it: one trial, the default, planned for the budget's 60 s
    assert len(ran) == 1 and ran[0].user_attrs["refit_of"] == "default" and ran[0].state == TrialState.COMPLETE
    assert ran[0].params["width"] == 0.5 and 1 <= ran[0].user_attrs["epochs"] <= 2  # (60 - 10 - spent) // 21
    parent = MlflowClient(summary.tracking_uri).get_run(summary.parent_run_id)
    assert parent.data.tags["search.exploration"].startswith("skipped")
    assert json.loads(parent.data.tags["search.default"])["width"] == 0.5
    assert parent.data.metrics["machine_images_per_second"] == 20.0  # the kept default's speed
    assert summary.best_trial == ran[0].number


def test_a_default_that_cannot_train_enough_epochs_in_the_refits_time_is_narrowed_to_a_width_that_can(monkeypatch):
    from types import SimpleNamespace

    from search import plan
    from search import space as spaces

    width = spaces.make_param("width", {"type": "categorical", "choices": [0.25, 0.5, 1.0, 1.5], "default": 1.0})
    epoch_at = {1.5: 150.0, 1.0: 86.0, 0.5: 36.0, 0.25: 20.0}  # seconds; 86 at width 1: the README command on AVX2

    def speed_at(setup, gflops, precision):  # a few timed steps of the default at its width
        return plan.Speed(gflops, 1.0, 1.0, 1.0, precision, setup_seconds=6.0,
                          epoch_seconds=epoch_at[setup.space.params["width"].default])

    monkeypatch.setattr(plan, "default_speed", speed_at)

    def fitted(timeout):
        space = spaces.Space("s", "scratch_cnn", "cifar10", {}, {"width": width}, {}, "", "")
        setup = SimpleNamespace(timeout=timeout, refit=0.8, space=space)
        speed = plan.fit_default_to_machine(setup, speed_at(setup, 190.0, "float32"))
        return setup.space.params["width"].default, speed.epoch_seconds

    assert fitted(600) == (0.5, 36.0)    # the refit's 480 s: 5 epochs at width 1, 13 at 0.5 (the widest that fits)
    assert fitted(1200) == (1.0, 86.0)   # 960 s: 11 at width 1, kept (never widened)
    assert fitted(300) == (0.25, 20.0)   # 240 s: 6 at 0.5, 11 at 0.25
    assert fitted(100) == (0.25, 20.0)   # 80 s: none fits, the narrowest


def test_exploration_pays_only_where_its_share_holds_several_first_rung_trials():
    from types import SimpleNamespace

    from search import plan
    from search.config import MIN_EXPLORED_TRIALS

    setup = SimpleNamespace(refit=0.8, config=SimpleNamespace(max_inference_ms=None), runner=object(),
                            space=SimpleNamespace(fidelity={"min_epochs": 1}))
    # the README command on a 2-core AVX2 CPU (2026-12-06): the default at 100 images/s, ~84 s an epoch of 6,000
    avx2 = plan.Speed(192, 100.0, 268, 80, "float32", epoch_seconds=84.0, setup_seconds=13.0)
    pays, one_trial = plan.exploration_pays(setup, avx2, 120)
    assert one_trial == pytest.approx(97.0) and one_trial < 120 and not pays  # one trial fits, not several
    assert plan.exploration_pays(setup, avx2, MIN_EXPLORED_TRIALS * 97.0)[0]
    avx512 = plan.Speed(250, 380.0, 268, 300, "bfloat16", epoch_seconds=17.0, setup_seconds=8.0)
    assert plan.exploration_pays(setup, avx512, 120)[0]
    # priced as explored trials train: the hour's benchmark on AVX2 (2026-12-06), the default at width 0.5, 253
    # images/s; an epoch of all 45,018 images ~200 s (three in exploration's 720 s), of the half an explored trial
    # trains on (fidelity.train_subset: auto, floored at a half) ~100 s: several fit
    setup.space.fidelity.update(train_subset="auto", val_subset="auto")
    hour = plan.Speed(161, 253.0, 67, 17, "float32", epoch_seconds=193.7, setup_seconds=4.0, train_images=45018,
                      val_images=4982)
    pays, one_trial = plan.exploration_pays(setup, hour, 720)
    assert pays and one_trial == pytest.approx(4.0 + (22509 + 4982 / 3) / 253 * 1.05, rel=1e-3)
    assert not plan.exploration_pays(setup, hour, 3 * one_trial)[0]


def test_explored_trials_train_on_the_planned_share_of_the_images(tmp_path):
    from types import SimpleNamespace

    from search import plan

    def fraction(train_subset, speed, explore):
        fidelity = {"min_epochs": 1, "train_subset": train_subset}
        setup = SimpleNamespace(refit=0.0, space=SimpleNamespace(fidelity=fidelity))  # tested trials
        return plan.exploration_fraction(setup, speed, explore)

    fast = plan.Speed(250, 600.0, 268, 480, "bfloat16", 13.0, 6.0, train_images=6000, val_images=5000)
    slow = plan.Speed(150, 90.0, 268, 70, "float32", 85.0, 40.0, train_images=6000, val_images=5000)
    assert fraction(1.0, fast, 120) is None and fraction(0.25, None, None) == 0.25   # fixed by the space
    assert fraction("auto", fast, 3600) is None              # a dozen full trials fit: no subset
    share = fraction("auto", fast, 180)                      # 15 s a trial: 9 s of epoch, 3,476 of 6,000 images
    assert 0.55 < share < 0.6
    assert fraction("auto", slow, 120) == 0.5                # never below the floor
    assert fraction("auto", None, 120) is None               # nothing measured (no time budget): all images
    # the refit plans an explored trial's epochs on every image
    assert plan.full_epoch_seconds(10.0, 1500, 6000, 4500) == pytest.approx(10.0 * (6000 + 1500) / (1500 + 1500))


def test_max_mflops_auto_is_derived_from_the_measured_speed_and_a_slower_machine_gets_a_lower_cap():
    from types import SimpleNamespace

    from search import plan
    from search.setup import RunSetup

    setup = SimpleNamespace(refit=0.0, space=SimpleNamespace(fidelity={"min_epochs": 1}))  # tested trials
    fast = plan.Speed(250, 600.0, 268, 480, "bfloat16", 10.0, 2.0, train_images=5400, val_images=600)
    slow = plan.Speed(150, 94.0, 268, 70, "float32", 64.0, 8.0, train_images=5400, val_images=600)
    # a README run: 600 s, 120 s of exploration, 480 s of refit
    fast_cap = plan.derived_max_mflops(setup, fast, 480, 120, None)
    assert fast_cap == 268  # exploration's 10 s a trial binds (268 x 0.8), and the default is never refused
    hour = plan.derived_max_mflops(setup, fast, 2880, 720, 0.5)  # an hour: 720 s explored on half the images
    assert hour == pytest.approx(268 * min(288 / 10, (60 - 2) / 5))
    assert plan.derived_max_mflops(setup, slow, 2880, 720, 0.5) < hour / 3  # the slower machine, the smaller models

    def cap(given, derived):
        run = SimpleNamespace(space=SimpleNamespace(budget={"max_mflops": given}), derived_max_mflops=derived)
        return RunSetup.max_mflops.fget(run)

    assert cap("auto", 900.0) == 900.0 and cap("auto", None) == 300 and cap(120, 900.0) == 120  # a number wins


def test_a_space_with_a_train_subset_explores_on_part_of_the_images(cifar_dir, tmp_path):
    space = write_space(tmp_path, TINY_SPACE + "fidelity: {resource: epochs, min_epochs: 1, train_subset: 0.5}\n")
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), workdir=str(tmp_path / "mlruns"),
                                      trials=2, epochs=1, sampler="random"))
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert done and all(t.user_attrs["train_images"] == 150 and t.user_attrs["full_train_images"] == 300
                        for t in done)
    assert all(t.user_attrs["budget_fraction"] == pytest.approx(0.5) for t in done)


@pytest.mark.slow
def test_the_refit_of_screens_explored_on_half_the_images_plans_from_timed_full_steps_and_is_tested(cifar_dir,
                                                                                                   tmp_path):
    space = write_space(tmp_path, TINY_SPACE + "fidelity: {resource: epochs, min_epochs: 1, train_subset: 0.5, "
                                               "val_subset: 0.5}\n")
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), workdir=str(tmp_path / "mlruns"),
                                      trials=2, epochs=1, timeout=30, refit=0.5, sampler="random"))
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    refits = [t for t in study.trials if t.user_attrs.get("refit_of") is not None and t.state == TrialState.COMPLETE]
    explored = [t for t in study.trials if t.user_attrs.get("refit_of") is None and t.state == TrialState.COMPLETE]
    assert refits and all(t.user_attrs["train_images"] == 300 and t.user_attrs["val_images"] == 300 for t in refits)
    assert explored and all(t.user_attrs["train_images"] == 150 and t.user_attrs["val_images"] == 150
                            for t in explored)
    # explored trials are screens: validation only; the refit's rounds are the models, and are tested
    client = MlflowClient(summary.tracking_uri)
    for trial in explored:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert "test_accuracy" not in run.data.metrics and run.data.tags["search.test"].startswith("not tested")
    assert all(client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics["test_accuracy"] > 0 for t in refits)


def test_a_screen_left_the_best_when_the_refit_does_not_run_is_tested_at_the_end(cifar_dir, tmp_path, monkeypatch):
    from search.drivers import optuna_driver

    monkeypatch.setattr(optuna_driver, "refit_best", lambda *args, **kwargs: None)  # as when no epoch fits
    space = write_space(tmp_path, TINY_SPACE)
    summary = run_search(SearchConfig(space=str(space), data_dir=str(cifar_dir), workdir=str(tmp_path / "mlruns"),
                                      trials=2, epochs=1, timeout=60, sampler="random"))
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    best = study.trials[summary.best_trial]
    assert best.user_attrs.get("refit_of") is None and best.user_attrs.get("test_accuracy") is None  # a screen
    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(best.user_attrs["mlflow_run_id"])
    assert 0 < run.data.metrics["test_accuracy"] <= 1 and run.data.metrics["inference_ms"] > 0
    assert run.data.tags["search.test"].startswith("tested after the search")
    assert (tmp_path / "mlruns" / "models" / summary.study_name / f"trial-{best.number}.predictions.npz").is_file()
    others = [t for t in study.trials if t.state == TrialState.COMPLETE and t.number != best.number]
    assert others and all("test_accuracy" not in client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics
                          for t in others)  # the other screens stay untested


def test_explored_trials_validate_on_the_planned_share_of_the_validation_images():
    from types import SimpleNamespace

    from search import plan

    def images(val_subset, speed, fraction, refit=0.8):
        setup = SimpleNamespace(refit=refit, space=SimpleNamespace(fidelity={"val_subset": val_subset}))
        return plan.explored_val_images(setup, speed, fraction)

    readme = plan.Speed(250, 600.0, 268, 480, "bfloat16", 13.0, 6.0, train_images=6000, val_images=4982)
    full = plan.Speed(250, 600.0, 268, 480, "bfloat16", 90.0, 6.0, train_images=45000, val_images=5000)
    assert images("auto", readme, 0.5) == 2000           # half of 3,000 training images is below the floor
    assert images("auto", readme, None) == 3000          # half of 6,000
    assert images("auto", full, 0.5) is None             # half of 22,500 is more than there are: all of them
    assert images(0.25, readme, 0.5) == 1245 and images(1, readme, 0.5) is None
    assert images("auto", readme, 0.5, refit=0.0) is None  # without a refit the trials are the models: all
    assert images("auto", None, 0.5) is None             # nothing measured


def test_a_screen_pays_no_evaluation_unless_a_constraint_needs_its_inference_time():
    from types import SimpleNamespace

    from runners import scratch_cnn
    from search import plan

    def overhead(refit, max_inference_ms=None):
        setup = SimpleNamespace(refit=refit, runner=scratch_cnn, config=SimpleNamespace(max_inference_ms=max_inference_ms))
        return plan.explored_overhead(setup, speed)

    speed = plan.Speed(250, 600.0, 268, 480, "bfloat16", 13.0, 16.0, evaluation_seconds=13.0)
    assert overhead(0.8) == 3.0                          # a screen: tracing only
    assert overhead(0.0) == overhead(0.8, max_inference_ms=2.0) == 16.0  # tested: no refit, or a constraint on it
    sizes = {"test": 6000, "val": 4982}                  # two views of each, a forward pass a third of a step
    assert plan.evaluation_seconds(sizes, 600.0, {"test_time_flip": True}) == pytest.approx(2 * 10982 / 3 / 600)
