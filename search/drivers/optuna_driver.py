"""The Optuna driver: a study's trials suggested by Optuna, each run through the one trial lifecycle.

`run_optuna_search(config)` prepares (space, runner, data, MLflow, then the Optuna study: every configuration
error before the first trial), recovers what a crashed process left, enqueues the first trials (baselines,
the space's default, a warm start), then `study.optimize` until --trials counted trials, the time budget's
exploration share, a stopping rule, or too many failures; then the refit (search/refit.py) and the finish
(search/finish.py).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import optuna
from optuna.trial import TrialState

from search import space as spaces
from search import tracking
from search.config import (HYPERBAND_FACTOR, MIN_EXPLORED_TRIALS, OBJECTIVES, TARGET_WAIT_SECONDS,
                           WARM_START_TRIALS, SearchConfig)
from search.errors import ConfigError, SearchAborted, SurplusTrial
from search.fidelity import TrialFidelity, pruning_callback
from search.finish import BestTrial, SearchSummary, closed_invocation, finish_invocation
from search.recovery import (DiscardCheckpoint, checkpoint_dir, close_retried_run, died_here, recover_stale_trials,
                             retried_trial, take_over_checkpoint, write_trial_file)
from search.plan import (Speed, at_exploration_fidelity, epochs_for, explored_fidelity, exploration_pays,
                         measure_machine, metrics_of, plan_exploration, screens_only)
from search.refit import refit_best, refit_default
from search.sampling import (COUNTED, best_value, constraint_values, count, feasible, make_pruner, make_sampler,
                             near_default, parse_objectives, pruner_name, refit_fraction, sampler_seed,
                             startup_trials)
from search.setup import RunSetup, as_config_error, prepare_run
from search.stopping import FailureStreak, MemoryWatch, StudyPatience
from search.stores import find_study, open_storage, optuna_storage_url, redact, trials_in
from search.trial import TrialPlan, TrialRejected, open_run, run_trial, start_weights, test_screen

log = logging.getLogger("search")


@dataclass(kw_only=True)
class Setup(RunSetup):
    """The run's set-up and its Optuna study."""

    study: optuna.Study
    storage_url: str
    refit: float = 0.0  # fraction of the timeout kept for the refit phase
    speed: Speed | None = None  # what this machine does with the default (time-budgeted runs, search/plan.py)
    explore_fraction: float | None = None  # share of the training images an explored trial trains on (plan.py)
    explore_val_images: int | None = None  # validation images an explored trial validates on (plan.py); None = all
    default_mflops: float | None = None  # the default's forward cost, the unit of `fidelity.resource: cost`


def prepare(config: SearchConfig) -> Setup:
    """Everything checked before the first trial: the run's set-up, then the Optuna study."""
    run = prepare_run(config, check=lambda space, budget: check_flags(config, space, budget.timeout))
    return as_config_error(_open_study, config, run)


def check_flags(config: SearchConfig, space: spaces.Space, timeout: float | None) -> None:
    """--objectives, --refit, --pruner, --warm-start and --baselines, before any data is loaded or any store
    written: a command that fails its checks creates no study."""
    objectives = parse_objectives(config.objectives)
    refit_fraction(config, timeout, objectives, space.budget.get("refit"))
    pruner_name(config, timeout, objectives)
    if config.warm_start:
        find_study(config.warm_start.partition(":")[0], None, config.workdir)  # its error lists the known studies
    if config.baselines and not spaces.baseline_trials(space):
        raise ConfigError(f"--baselines: space {space.source} has no baselines for {space.dataset} "
                          "(add them under 'baselines:')")


def _open_study(config: SearchConfig, run: RunSetup) -> Setup:
    objectives = parse_objectives(config.objectives)
    refit = refit_fraction(config, run.timeout, objectives, run.space.budget.get("refit"))
    storage_url = optuna_storage_url(config)
    storage = open_storage(storage_url)
    # a server or journal store may be shared by workers on other hosts even when this one runs alone
    shared = config.workers > 1 or not storage_url.startswith("sqlite:")
    seed = sampler_seed(config.seed, trials_in(storage, run.study_name), shared)
    fidelity = run.space.fidelity
    pruner = make_pruner(pruner_name(config, run.timeout, objectives), run.epochs, fidelity.get("min_epochs", 1),
                         fidelity.get("reduction_factor", HYPERBAND_FACTOR), fidelity.get("resource", "epochs"))
    study = optuna.create_study(study_name=run.study_name, storage=storage, load_if_exists=True,
                                directions=[OBJECTIVES[name][0] for name in objectives],
                                sampler=make_sampler(config.sampler, seed, run.space, run.target), pruner=pruner)
    if len(study.directions) != len(objectives):
        raise ConfigError(f"study {run.study_name} was created with {len(study.directions)} objective(s); "
                          f"--objectives {config.objectives} has {len(objectives)}. Use another --study-name.")
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(objectives)  # optuna-dashboard then says val_accuracy, not "Objective 0"
    return Setup(**{f: getattr(run, f) for f in RunSetup.__dataclass_fields__}, study=study,
                 storage_url=storage_url, refit=refit)


def run_optuna_search(config: SearchConfig) -> SearchSummary:
    """Run trials until the study has `trials` complete or pruned ones (or time runs out)."""
    setup = prepare(config)
    study, client = setup.study, setup.client
    from runners.device import configure_devices
    from search.environment import describe_environment

    environment = describe_environment(configure_devices(config.mixed_precision))
    recover_stale_trials(study, client, setup.experiment_id, setup.checkpoints, resume=count(study) < setup.target)
    parent = tracking.start_parent_run(client, setup.experiment_id, study.study_name,
                                       invocation_settings(setup), environment, setup.space.text,
                                       {"budget": setup.space.budget,
                                        "params": {k: asdict(v) for k, v in setup.space.params.items()}})
    summary = SearchSummary(study.study_name, redact(setup.storage_url), redact(setup.tracking_uri),
                            parent, target=setup.target)
    if setup.timeout and setup.refit:  # a time budget to plan: measure what this machine does first
        setup.speed = measure_machine(setup, str(environment.get("mixed_precision") or "float32"))
        tracking.log_metrics(client, parent, metrics_of(setup.speed))

        tracking.set_tags(client, parent, {"search.precision": setup.speed.precision,  # and the default it kept
                                           "search.default": json.dumps(spaces.default_params(setup.space))})
    first_trials(setup)

    def finish(status: str) -> None:
        setup.background.shutdown(wait=True)  # every completed trial's run is closed before recovery looks
        # a worker that died while this one finished the study must not leave its trial running forever
        recover_stale_trials(study, client, setup.experiment_id, setup.checkpoints,
                             resume=count(study) < setup.target)
        summary.refits = sum(1 for t in study.get_trials(deepcopy=False, states=COUNTED)
                             if t.user_attrs.get("refit_of") is not None)
        best = best_trial(study)
        if (best is not None and summary.stopped != "memory"  # a process replaced for memory: the study goes on
                and study.trials[best.number].user_attrs.get("test_accuracy") is None):
            # a screen is the best (no refit round replaced it): the registered model must have a test figure
            # (a finished Optuna trial cannot be changed: its run in MLflow gets the figures)
            test_screen(setup, best.number, best.run_id,
                        at_exploration_fidelity(setup, spaces.complete_params(setup.space, best.params)))
        finish_invocation(setup, parent, summary, status, best, study)

    with closed_invocation(finish):
        optimize(setup, parent, environment, summary)
    return summary


def best_trial(study: optuna.Study) -> BestTrial | None:
    """The most accurate feasible completed trial (with several objectives the front is in the leaderboard)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]
    if not complete:
        return None
    best = max(complete, key=lambda t: t.values[0])
    return BestTrial(best.number, best.values[0], best.params, best.user_attrs.get("mlflow_run_id"))


def invocation_settings(setup: Setup) -> dict:
    """What this invocation was asked to do, for the parent run's params."""
    c = setup.config
    return {"space": setup.space.name, "space_file": setup.space.source, "dataset": setup.dataset,
            "data_dir": c.data_dir, "trials_target": setup.target, "timeout": setup.timeout, "epochs": setup.epochs,
            "patience": setup.patience, "subset": setup.subset, "sampler": c.sampler,
            "pruner": pruner_name(c, setup.timeout, parse_objectives(c.objectives)), "objectives": c.objectives,
            "max_params": c.max_params, "max_inference_ms": c.max_inference_ms, "baselines": c.baselines,
            "seed": c.seed, "storage": redact(setup.storage_url), "breeds": c.breeds,
            "image_size": c.image_size, "workers": c.workers, "warm_start": c.warm_start, "refit": setup.refit}


# ---------------------------------------------------------------- the first trials


def first_trials(setup: Setup) -> None:
    """Enqueue the hand-made baselines (--baselines), the space's defaults in a new study, a warm start's best,
    and, when the space says `start: near_default`, perturbations of the default as TPE's start-up trials."""
    study = setup.study
    new = not study.get_trials(deepcopy=False)
    if setup.config.baselines:
        enqueue_baselines(setup)
    if setup.config.default_trial and new:
        study.enqueue_trial(spaces.default_params(setup.space), user_attrs={"source": "default"})
    if setup.config.warm_start:
        enqueue_warm_start(setup)
    if setup.config.default_trial and new and setup.config.sampler == "tpe" and setup.space.start == "near_default":
        enqueue_near_default(setup)


def enqueue_near_default(setup: Setup) -> None:
    """TPE's start-up trials after the default as perturbations of it (search/sampling.py: near_default): wide
    random draws rarely beat a tuned default in a short budget, small moves around it can."""
    study = setup.study
    queued = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    wanted = startup_trials(setup.target) - queued
    rng = np.random.default_rng(setup.config.seed)
    for _ in range(max(0, wanted)):
        study.enqueue_trial(near_default(setup.space, rng), user_attrs={"source": "near-default"},
                            skip_if_exists=True)
    if wanted > 0:
        log.info(f"start-up: {wanted} perturbations of the space's default before TPE's own suggestions")


def enqueue_baselines(setup: Setup) -> None:
    """The space's baselines for this dataset, best-known first, each once per study, tagged as baselines."""
    found = spaces.baseline_trials(setup.space)  # check_flags made sure there are some
    for label, params in found:
        searched = {k: v for k, v in params.items() if setup.space.params[k].type != "fixed"}
        setup.study.enqueue_trial(searched, user_attrs={"source": f"baseline:{label}", "baseline": label},
                                  skip_if_exists=True)
    log.info(f"baselines: enqueued {len(found)} hand-made configurations ahead of the search")


def enqueue_warm_start(setup: Setup) -> None:
    """The K best configurations of another study, kept to what is valid in this space and dataset."""
    name, _, k = setup.config.warm_start.partition(":")
    source = find_study(name, None, setup.config.workdir)
    done = sorted((t for t in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
                  key=lambda t: t.values[0], reverse=True)[: int(k or WARM_START_TRIALS)]
    source_dataset = source.user_attrs.get("dataset")
    for t in done:
        given = dict(t.params)
        if source_dataset != setup.dataset.split(":")[0]:
            given.pop("image_size", None)  # image and batch size never carry across datasets
            given.pop("batch_size", None)
        params = {k: v for k, v in spaces.complete_params(setup.space, given).items()
                  if setup.space.params[k].type != "fixed"}
        setup.study.enqueue_trial(params, user_attrs={"source": f"warm-start:{name}#{t.number}"},
                                  skip_if_exists=True)
    log.info(f"warm start: enqueued {len(done)} configurations from {name}")


# ---------------------------------------------------------------- the loop


def optimize(setup: Setup, parent: str, environment: dict, summary: SearchSummary) -> None:
    """study.optimize with the stopping rules of conventions.md: target count, time, failures in a row."""
    study = setup.study
    study.set_user_attr("dataset", setup.dataset.split(":")[0])
    study.set_user_attr("space", setup.space.name)
    study.set_user_attr("objectives", setup.config.objectives)
    done = count(study)
    if done >= setup.target:
        log.info(f"study {study.study_name} already has {done} of {setup.target} trials; raise --trials to add more")
        summary.counted = done
        return
    failures = FailureStreak(setup.config.max_failures)
    patience = StudyPatience(setup.config.study_patience, setup.config.min_improvement, setup.config.within)
    memory = MemoryWatch(setup.max_memory_growth)
    callbacks = [optuna.study.MaxTrialsCallback(setup.target, states=COUNTED), failures, patience, memory,
                 DiscardCheckpoint(setup.checkpoints)]
    objective = make_objective(setup, parent, environment, summary)
    started = time.monotonic()
    summary.budget_started = setup.config.budget_started or time.time()
    spent = max(0.0, time.time() - summary.budget_started)  # by the processes this one replaces
    explore = max(0.0, setup.timeout * (1 - setup.refit) - spent) if setup.timeout else None
    if explore and setup.speed and not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        pays, one_trial = exploration_pays(setup, setup.speed, explore)
        if not pays:  # a trial or two would be all the search: train the default for the budget instead
            log.info(f"exploration cannot pay on this machine: one trial of the space's default at its first rung "
                     f"takes ~{one_trial:.0f} s, and exploration's {explore:.0f} s hold fewer than "
                     f"{MIN_EXPLORED_TRIALS}; training the default for the whole budget instead")
            tracking.set_tags(setup.client, parent, {"search.exploration": "skipped: cannot pay on this machine"})
            remaining = setup.timeout - spent
            epochs = epochs_for(setup.speed, remaining)
            refit_default(setup, parent, objective, remaining - setup.speed.setup_seconds,
                          epochs, setup.speed.setup_seconds + epochs * setup.speed.epoch_seconds)
            summary.counted, summary.stopped = count(study), "timeout"
            return
    plan_exploration(setup, parent, explore)
    if explore != 0.0:
        study.optimize(objective, n_trials=None, timeout=explore, callbacks=callbacks,
                       catch=(Exception,))  # the runner's release collects garbage once per trial
    summary.counted = count(study)
    if failures.tripped:
        summary.stopped = "failures"
        raise SearchAborted(f"{failures.limit} trials failed in a row; the last one: {failures.last_reason}")
    if memory.reason:
        summary.stopped = "memory"
        summary.stop_details = memory.figures
        log.info(f"stopped: {memory.reason}")
    elif patience.reason:
        summary.stopped = "patience"
        summary.stop_details = patience.figures
        log.info(f"stopped: {patience.reason}")
    elif summary.counted < setup.target:
        summary.stopped = "timeout"
        # the share, not what was left of it: a resumed run may have had none left
        budget = (f"exploration's {setup.timeout * (1 - setup.refit):.0f} s of the {setup.timeout:.0f} s budget"
                  if setup.refit
                  else f"time budget of {setup.timeout:.0f} s")
        log.info(f"{budget} reached after {summary.counted} of {setup.target} trials; "
                 "run the same command again to continue (--timeout 0 for no limit)")
    if setup.refit and not memory.reason:  # a process about to be replaced starts no long trial
        # at most its share: a run whose trials end early is not stretched to the whole --timeout
        elapsed = spent + (time.monotonic() - started)
        refit_best(setup, parent, objective, min(setup.timeout - elapsed, setup.timeout * setup.refit), elapsed)
        summary.counted = count(study)


def make_objective(setup: Setup, parent: str, environment: dict, summary: SearchSummary):
    """The function Optuna calls per trial: plan it from Optuna's suggestion, then the shared trial lifecycle."""
    from runners.callbacks import Progress, checkpoint_state

    study, client, space = setup.study, setup.client, setup.space

    def objective(trial: optuna.Trial) -> float:
        retry_of = retried_trial(study, trial)
        refit_of = trial.user_attrs.get("refit_of")  # the refit phase's trial (see search/refit.py)
        epochs = int(trial.user_attrs.get("epochs") or setup.epochs)
        if refit_of is None and beyond_target(study, trial, setup.target):
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("fail_reason", f"study already has {setup.target} trials")
            raise SurplusTrial(f"study already has {setup.target} trials")
        summary.trials_run += 1
        folder = checkpoint_dir(setup.checkpoints, trial.number)
        resumed = take_over_checkpoint(setup, trial, retry_of)
        if retry_of is not None and resumed is None:
            close_retried_run(client, trial)
        suggested = spaces.suggest_params(trial, space)
        params = at_exploration_fidelity(setup, suggested) if refit_of is None else suggested
        if params != suggested:
            trial.set_user_attr("cheaper_fidelity", True)  # its epoch timings say little of the refit's
        fidelity = explored_fidelity(setup, params, epochs) if refit_of is None else TrialFidelity(epochs)
        epochs = fidelity.epochs
        seed = resumed["seed"] if resumed else setup.config.seed * 1000 + trial.number
        for key, value in {"host": socket.gethostname(), "pid": os.getpid(), "seed": seed}.items():
            trial.set_user_attr(key, value)
        # a refit's schedule spans its epochs: early stopping and the pruner must not cut it short, and it runs
        # even when exploration reached --trials
        patience = epochs if refit_of is not None else setup.patience
        prunable = len(study.directions) == 1 and refit_of is None
        plan = TrialPlan(
            trial.number, params, seed, epochs, patience,
            context={"dataset": setup.dataset, "subset": setup.subset, "epochs_max": epochs, "patience": patience,
                     "seed": seed, "model": space.model},
            tags=trial_tags(setup, trial, environment, retry_of, refit_of),
            progress=Progress(trial.number, count(study) + 1, setup.target, epochs, best_value(study),
                              where=f"refit round {trial.user_attrs.get('refit_round', 1)}" if refit_of is not None
                              else None),
            callbacks=[pruning_callback(trial, fidelity)] if prunable else [],
            checkpoint=folder, resumed=bool(resumed),
            # a refit round resumed in a later run keeps no deadline: its budget was the earlier run's
            deadline=trial.user_attrs.get("deadline") if not resumed else None,
            initial_weights=start_weights(setup, trial.number, trial.user_attrs.get("continues")),
            epochs_before=trial.user_attrs.get("epochs_before", 0),
            train_fraction=setup.explore_fraction if refit_of is None else None, epoch_work=fidelity.epoch_work,
            val_images=setup.explore_val_images if refit_of is None else None,
            tested=refit_of is not None or not screens_only(setup))
        if resumed:
            run_id = resumed["mlflow_run_id"]
            trial.set_user_attr("resumes", resumed["trial"])
            trial.set_user_attr("resumed_from_epoch", resumed["epoch"])
            log.info(f"trial {trial.number}: resumes trial {resumed['trial']} after its epoch {resumed['epoch']}")
            tracking.reopen_trial_run(client, run_id, parent, trial.number, {
                **plan.tags, "search.resumes_trial": resumed["trial"], "search.resumed_at_epoch": resumed["epoch"]})
        else:
            run_id = open_run(setup, parent, plan)
        trial.set_user_attr("mlflow_run_id", run_id)
        write_trial_file(folder, study.study_name, trial.number, run_id, params, seed)
        epochs_done = (checkpoint_state(folder) or {}).get("history", {})
        if resumed:  # an epoch saved but not logged (killed between the two) is logged now, from the checkpoint
            tracking.log_missing_epochs(client, run_id, epochs_done)
        restored = epochs_done.get("val_accuracy", [])
        reported = study._storage.get_trial(trial._trial_id).intermediate_values
        for epoch, value in enumerate(restored if len(study.directions) == 1 else []):  # multi-objective: no reports
            step = fidelity.step(epoch)
            if step not in reported:  # a heartbeat retry may have inherited them
                trial.report(value, step)  # the restored epochs, so the pruner sees the whole curve
        plan.progress.val_history = list(restored)

        def on_end(state: str, reason: str) -> None:
            if state == "KILLED":
                trial.set_user_attr("interrupted", True)
            trial.set_user_attr("fail_reason" if state in ("FAIL", "KILLED") else "end_reason", reason)

        try:
            metrics, result = run_trial(setup, plan, run_id, on_end=on_end, ranking=lambda: ranking(study))
        except TrialRejected as err:
            raise optuna.TrialPruned(str(err)) from None
        record_in_study(setup, trial, metrics, result)
        values = [metrics[OBJECTIVES[name][1]] for name in parse_objectives(setup.config.objectives)]
        return values[0] if len(values) == 1 else values

    return objective


def trial_tags(setup: Setup, trial: optuna.Trial, environment: dict, retry_of, refit_of) -> dict:
    """The MLflow tags of an Optuna trial's run: where its parameters came from, how to re-run it."""
    source = f"retry:{retry_of}" if retry_of is not None else trial.user_attrs.get("source", "sampler")
    refit_tags = {}
    if refit_of is not None:  # a resumed or retried refit is still the refit
        source, refit_tags = "refit", {"search.refit": "true", "search.refit_of": str(refit_of)}
    return {"search.source": source, "search.device": environment.get("device", ""), **refit_tags,
            "search.baseline": trial.user_attrs.get("baseline", ""),
            "search.rerun_command": f"python -m search.run --rerun {setup.study.study_name}:{trial.number}"}


def ranking(study: optuna.Study) -> list[tuple[float, int]]:
    """(val_accuracy, number) of the study's completed feasible trials, for the kept models."""
    return [(t.values[0], t.number) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if feasible(t)]


def record_in_study(setup: Setup, trial: optuna.Trial, metrics: dict, result) -> None:
    """What Optuna keeps of a completed trial: summary user attrs, the refit's epoch cost, the constraints."""
    for key in ("test_accuracy", "test_top3_accuracy", "train_seconds", "param_count", "inference_ms",
                "budget_fraction", "epochs_run", "trial_seconds", "train_images", "full_train_images", "val_images"):
        trial.set_user_attr(key, metrics.get(key))
    timed = result.history.get("epoch_seconds", [])[1:] or result.history.get("epoch_seconds", [])
    if timed:  # what one more epoch of this configuration costs, for a refit's plan (the first epoch also traces)
        trial.set_user_attr("epoch_seconds", sum(timed) / len(timed))
    constraints = constraint_values(setup.config, metrics)
    for name, over in constraints.items():  # Optuna's constrained search (TPE) and Pareto front read these
        trial.set_constraint(name, over)
    if constraints:
        tracking.set_tags(setup.client, trial.user_attrs["mlflow_run_id"],
                          {"search.feasible": str(all(v <= 0 for v in constraints.values()))})
    setup.runner.release(result)


def beyond_target(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """True if the study reached its target; waits while older running trials of other workers could reach it.

    Workers claim trials at the same moment, so counting only finished trials would overshoot the target by
    up to one trial per worker. A trial waits on older ones only (no two wait on each other); a trial whose
    worker died stops holding it once found dead (heartbeat storages after the grace period, or a dead pid
    on this host)."""
    host, announced = socket.gethostname(), False
    while True:
        trials = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
        done = sum(t.state in COUNTED for t in trials)
        ahead = sum(1 for t in trials if t.state == TrialState.RUNNING and t.number < trial.number
                    and not died_here(t, host))
        if done >= target or done + ahead < target:
            return done >= target
        if not announced:
            log.info(f"trial {trial.number}: waiting for {ahead} running trials that may complete the study")
            announced = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # as Optuna does before each trial
        time.sleep(TARGET_WAIT_SECONDS)
