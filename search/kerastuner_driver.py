"""The Keras Tuner driver: Hyperband, Bayesian or random search over the same space files and runner code.

    python -m search.run --space scratch_cnn --driver kerastuner --tuner hyperband --trials 30

`run_kerastuner_search(config)` checks everything first (space, data, MLflow store), as the Optuna driver
does. Then a keras_tuner tuner drives `SpaceHyperModel`: `build` declares the space through
`search.space.declare_hyperparameters` (the declaration Optuna reads too) and compiles the runner's
model; `fit` trains it on the runner's tf.data pipelines with the MLflow epoch logger. The tuner's hooks
(`TrackedTrials`) open each trial's run nested under this invocation's parent run, tagged like an Optuna
trial (`optuna.study`, `optuna.trial_number` = Keras Tuner's trial index), and close it COMPLETE, PRUNED
(architecture rejected before training) or FAIL, so the leaderboard and `--compare` read both drivers alike.

How `--trials N` maps (conventions.md: N counts complete or pruned trials, failed ones do not):
- random, bayesian: `max_trials` is raised before each trial to N plus the failed trials so far.
- hyperband: `max_epochs` = `--epochs` (the space's budget), factor 3, and as many Hyperband iterations
  as it takes to hold N trials; the search stops after N counted trials, inside an iteration if need be.
  With 4 epochs one iteration is 10 trials (7 in the 2-bracket halving, 3 full-length), so N = 30 is 3.
Keras Tuner's own state lives in `<workdir>/kerastuner/<study>/`; running the same command again
reloads it (overwrite=False) and goes on to the target, re-running a trial an interrupt cut short.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import keras_tuner as kt

from search import space as spaces
from search import study as optuna_driver
from search import tracking
from search.config import SearchConfig, artifact_root, tracking_uri
from search.errors import ConfigError

log = logging.getLogger("search")
TUNERS = ("hyperband", "bayesian", "random")
HYPERBAND_FACTOR = 3
KT_VALUES = {"tuner/epochs": "kerastuner.epochs", "tuner/initial_epoch": "kerastuner.initial_epoch",
             "tuner/bracket": "kerastuner.bracket", "tuner/round": "kerastuner.round",
             "tuner/trial_id": "kerastuner.parent_trial"}


# ---------------------------------------------------------------- set-up


@dataclass(kw_only=True)
class TunerSetup(optuna_driver.RunSetup):
    """Everything checked before the first trial: the run's set-up, its study name and the tuner's folder."""

    study_name: str
    directory: Path


def prepare(config: SearchConfig) -> TunerSetup:
    """Read the space, translate it, find the data, open MLflow: every configuration error surfaces here."""
    return optuna_driver.as_config_error(_prepare, config)


def _prepare(config: SearchConfig) -> TunerSetup:
    if config.tuner not in TUNERS:
        raise ConfigError(f"unknown tuner '{config.tuner}'; available: {', '.join(TUNERS)}")
    workdir = config.resolved_workdir()
    dataset, space, budget = optuna_driver.resolve_space(config)
    if str(config.refit).strip().lower() != "auto" and optuna_driver.refit_fraction(config, None, ["val_accuracy"]):
        raise ConfigError(f"--refit {config.refit}: the Keras Tuner driver has no refit phase; use --driver optuna "
                          "or leave --refit out")
    if not hasattr(optuna_driver.model_runner(space.model), "build_model"):
        raise ConfigError(f"model '{space.model}' has no build_model(params, image_size, n_classes), which the "
                          "Keras Tuner driver needs; use --driver optuna for it")
    check_translation(space)
    study_name = config.study_name or f"{space.name}-{dataset.split(':')[0]}-kerastuner"
    uri = tracking_uri(config.tracking_uri, workdir)
    cache: dict = {}
    optuna_driver.probe_data(config, dataset, space, budget.subset, workdir, cache)
    client = tracking.connect(uri)
    exp_id = tracking.experiment_id(client, study_name, artifact_root(uri, workdir))
    return TunerSetup(config, space, dataset, target=budget.trials, timeout=budget.timeout, epochs=budget.epochs,
                      patience=budget.patience, subset=budget.subset, client=client, experiment_id=exp_id,
                      tracking_uri=uri, study_name=study_name, directory=workdir / "kerastuner", data_cache=cache)


def check_translation(space: spaces.Space) -> None:
    """Declare the space on a fresh HyperParameters: what Keras Tuner cannot express is a SpaceError now."""
    try:
        spaces.declare_hyperparameters(kt.HyperParameters(), space)
    except (TypeError, ValueError) as err:
        raise spaces.SpaceError(f"{space.source}: Keras Tuner cannot express this space: {err}. Every choice "
                                "list must hold one type (int, float, str or bool); or use --driver optuna") from None


# ---------------------------------------------------------------- one trial


@dataclass
class TrialRecord:
    """The trial being run: its MLflow run, values, seed, and how it ended."""

    number: int
    run_id: str
    params: dict
    seed: int
    logger: tracking.EpochLogger
    progress: object
    started: float = 0.0           # when its model began to be built: trial_seconds counts from here
    completed: bool = False
    rejection: str | None = None   # ArchitectureError: pruned before training
    reason: str | None = None      # why it failed


class SpaceHyperModel(kt.HyperModel):
    """A space file as a Keras Tuner HyperModel: the runner's model, optimiser, loss and pipelines."""

    def __init__(self, setup: TunerSetup, parent_run: str, environment: dict):
        super().__init__(name=setup.space.name)
        self.setup, self.parent_run, self.environment = setup, parent_run, environment
        self.runner = optuna_driver.model_runner(setup.space.model)
        self.current: TrialRecord | None = None
        self.trials_run = 0
        self.ready = False  # set once the tuner exists; see build()

    def declare_hyperparameters(self, hp):
        """The whole space, conditional parameters included, before the first build."""
        spaces.declare_hyperparameters(hp, self.setup.space)

    def build(self, hp):
        """The runner's model for these values, compiled with the runner's optimiser, loss and metrics."""
        from runners.train import ArchitectureError, make_loss, make_optimizer

        params = spaces.declare_hyperparameters(hp, self.setup.space)
        if not self.ready:
            # Keras Tuner builds while it explores conditional scopes at construction; declare_hyperparameters
            # has registered every parameter already, so a placeholder keeps a bad value from crashing set-up
            return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        if self.current:
            self.current.started = time.perf_counter()  # building counts, as in the runner's train_and_evaluate
        keras.utils.set_random_seed(self.current.seed if self.current else self.setup.config.seed)
        data = optuna_driver.dataset_at(self.setup, params["image_size"])
        steps = math.ceil(len(data.splits["train"][1]) / params["batch_size"])
        try:
            model = self.runner.build_model(params, data.image_size, len(data.class_names),
                                             self.setup.space.architectures)
        except ArchitectureError as err:
            if self.current:
                self.current.rejection = str(err)
            raise
        model.compile(optimizer=make_optimizer(params, steps, self.setup.epochs), loss=make_loss(params),
                      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                               keras.metrics.TopKCategoricalAccuracy(k=3, name="top3_accuracy")])
        return model

    def fit(self, hp, model, *args, epochs=None, initial_epoch=0, callbacks=None, **kwargs):
        """Train on the runner's pipelines (Hyperband sets epochs and initial_epoch), then test once."""
        record = self.current
        try:
            return self._fit(record, model, epochs or self.setup.epochs, initial_epoch, list(callbacks or []))
        except Exception as err:
            record.reason = f"{type(err).__name__}: {str(err).splitlines()[0][:500] if str(err) else ''}"
            raise

    def _fit(self, record: TrialRecord, model, epochs: int, initial_epoch: int, tuner_callbacks: list):
        from runners import train as runner
        from runners.pipeline import evaluation_batches, training_batches

        setup, params = self.setup, record.params
        data = optuna_driver.dataset_at(setup, params["image_size"])
        tracking.log_datasets(setup.client, record.run_id, data)
        (x_train, y_train), (x_val, y_val) = data.splits["train"], data.splits["val"]
        n_classes, batch, size = len(data.class_names), params["batch_size"], data.image_size
        train = training_batches(x_train, y_train, n_classes, batch,
                                 setup.space.recipes[params.get("augmentation", "none")], size, record.seed,
                                 first_epoch=initial_epoch)
        val = evaluation_batches(x_val, y_val, n_classes, max(batch, 256), size)
        # EpochClock first: every later callback (MLflow, Keras Tuner) sees epoch_seconds and learning_rate
        ours = [runner.EpochClock(), keras.callbacks.TerminateOnNaN(),
                keras.callbacks.EarlyStopping("val_accuracy", patience=setup.patience, mode="max",
                                              restore_best_weights=True)]
        if params.get("lr_schedule") == "plateau":
            ours.append(keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=1))
        started = time.perf_counter()
        history = model.fit(train, validation_data=val, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
                            shuffle=False, callbacks=ours + [record.logger, record.progress] + tuner_callbacks)
        result = runner.result_of(history.history, time.perf_counter() - started, model)
        result.test, result.test_probabilities = runner.evaluate(model, data, params)
        log_completed(setup, record, result, time.perf_counter() - record.started, data)
        record.completed = True
        return history

    # -- the trial's MLflow run, opened and closed by the tuner's hooks

    def begin(self, trial, counted: int, best: float | None) -> None:
        """Open (or, for a trial an interrupt cut short, reopen) the trial's nested MLflow run."""
        from runners.train import Progress

        setup = self.setup
        number = int(trial.trial_id)
        params = spaces.declare_hyperparameters(trial.hyperparameters.copy(), setup.space)
        values = trial.hyperparameters.values
        # a continued Hyperband trial keeps its parent's seed: its epochs follow on in the same batch order
        seed = setup.config.seed * 1000 + int(values.get("tuner/trial_id", number))
        context = {"dataset": setup.dataset, "subset": setup.subset, "epochs_max": setup.epochs,
                   "patience": setup.patience, "seed": seed, "model": setup.space.model}
        tags = {"search.driver": "kerastuner", "search.source": f"kerastuner:{setup.config.tuner}",
                "search.device": self.environment.get("device", ""), "kerastuner.trial_id": trial.trial_id,
                **{tag: values[key] for key, tag in KT_VALUES.items() if key in values}}
        run_id = reopen_run(setup, self.parent_run, number, tags) or tracking.start_trial_run(
            setup.client, setup.experiment_id, self.parent_run, setup.study_name, number, params, context, tags)
        self.trials_run += 1
        epochs = values.get("tuner/epochs", setup.epochs)
        self.current = TrialRecord(number, run_id, params, seed, tracking.EpochLogger(setup.client, run_id),
                                   Progress(number, counted + 1, setup.target, epochs, best))

    def end(self, trial) -> str:
        """Close the trial's run COMPLETE, PRUNED or FAIL with the reason; return that state."""
        from runners import train as runner

        record, self.current = self.current, None
        if trial.status == "COMPLETED" and record.completed:
            state, reason = "COMPLETE", None
        elif record.rejection:
            state, reason = "PRUNED", record.rejection
            log.info(f"trial {record.number}: rejected before training: {reason}")
        else:
            state = "FAIL"
            reason = record.reason or last_line(trial.message) or "unknown"
            log.warning(f"trial {record.number}: failed: {reason}")
        tracking.finish_trial_run(self.setup.client, record.run_id, state, reason)
        runner.release()
        return state


def log_completed(setup: TunerSetup, record: TrialRecord, result, trial_seconds: float, data) -> None:
    """The same summary metrics, runner tags and test evaluation an Optuna trial's run gets."""
    from search.evaluation import log_evaluation

    metrics = optuna_driver.trial_metrics(result, trial_seconds, record.logger.seconds)
    tracking.log_metrics(setup.client, record.run_id, metrics)
    if result.tags:
        tracking.set_tags(setup.client, record.run_id, result.tags)
    if result.test_probabilities is not None:
        log_evaluation(setup.client, record.run_id, data.splits["test"][1], result.test_probabilities,
                       data.class_names)


def reopen_run(setup: TunerSetup, parent_run: str, number: int, tags: dict) -> str | None:
    """The run of this trial number left KILLED by an interrupt, reopened under this invocation; else None."""
    runs = setup.client.search_runs(
        [setup.experiment_id], max_results=1,
        filter_string=f"tags.`optuna.trial_number` = '{number}' and tags.`search.state` = 'KILLED'")
    if not runs:
        return None
    run_id = runs[0].info.run_id
    setup.client.update_run(run_id, status="RUNNING")
    tracking.set_tags(setup.client, run_id, {**tags, "mlflow.parentRunId": parent_run, "search.state": "RUNNING",
                                             "search.pid": str(os.getpid())})
    return run_id


def last_line(message: str | None) -> str:
    """The exception line at the end of a Keras Tuner trial's traceback message."""
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


# ---------------------------------------------------------------- the tuners


class TrackedTrials:
    """Keras Tuner hooks: the study's target and time budget before each trial, MLflow runs around it."""

    def configure(self, setup: TunerSetup, deadline: float | None) -> None:
        """Remember the target, the time limit and the failure limit."""
        self.setup, self.deadline = setup, deadline
        self.streak, self.last_reason, self.stopped = 0, "", "target"

    def pre_create_trial(self):
        """Let the oracle create a trial only while the target is not met and time remains."""
        oracle = self.oracle
        remaining = self.setup.target - counted(oracle)
        if self.deadline is not None and time.time() >= self.deadline and remaining > 0:
            remaining, self.stopped = 0, "timeout"
        limit = len(oracle.trials) + max(remaining, 0)
        oracle.max_trials = limit if limit > 0 else -1  # 0 would mean "no limit" to Keras Tuner

    def on_trial_begin(self, trial):
        """Open the trial's MLflow run."""
        super().on_trial_begin(trial)
        self.hypermodel.begin(trial, counted(self.oracle), best_score(self.oracle))

    def on_trial_end(self, trial):
        """Close the MLflow run, let Keras Tuner record the trial, stop after too many failures in a row."""
        state = self.hypermodel.end(trial)
        super().on_trial_end(trial)
        if state != "FAIL":
            self.streak = 0
            return
        self.streak += 1
        self.last_reason = last_line(trial.message)
        if self.streak >= self.setup.config.max_failures:
            self.stopped = "failures"
            raise optuna_driver.SearchAborted(f"{self.streak} trials failed in a row; the last one: {self.last_reason}")


class TrackedHyperband(TrackedTrials, kt.Hyperband):
    """Hyperband with MLflow runs and the study's stopping rules."""


class TrackedBayesianOptimization(TrackedTrials, kt.BayesianOptimization):
    """Bayesian optimisation (Gaussian process) with MLflow runs and the study's stopping rules."""


class TrackedRandomSearch(TrackedTrials, kt.RandomSearch):
    """Random search with MLflow runs and the study's stopping rules."""


def counted(oracle) -> int:
    """Trials that count toward the target: completed, or rejected before training (pruned)."""
    return sum(1 for t in oracle.trials.values()
               if t.status == "COMPLETED" or (t.status in ("FAILED", "INVALID") and "ArchitectureError" in
                                              (t.message or "")))


def best_score(oracle) -> float | None:
    """The best validation accuracy of a completed trial so far."""
    return max((t.score for t in oracle.trials.values() if t.status == "COMPLETED" and t.score is not None),
               default=None)


def hyperband_trials_per_iteration(max_epochs: int, factor: int = HYPERBAND_FACTOR) -> int:
    """How many trials one Hyperband iteration runs (every bracket, every round), as Keras Tuner sizes them.

    Asks Keras Tuner's own (private) sizing methods, so the count cannot drift from what the oracle runs."""
    oracle = kt.oracles.HyperbandOracle(objective=kt.Objective("val_accuracy", "max"), max_epochs=max_epochs,
                                        factor=factor)
    return sum(oracle._get_size(b, r) for b in range(oracle._get_num_brackets()) for r in range(b + 1))


def make_tuner(setup: TunerSetup, hypermodel: SpaceHyperModel, deadline: float | None):
    """The chosen tuner over the hypermodel, its state under <workdir>/kerastuner/<study>/ (reloaded if there)."""
    common = dict(hypermodel=hypermodel, objective=kt.Objective("val_accuracy", "max"), seed=setup.config.seed,
                  directory=str(setup.directory), project_name=setup.study_name, overwrite=False,
                  max_consecutive_failed_trials=10 ** 9)  # failures in a row are ours to count (max_failures)
    name = setup.config.tuner
    if name == "hyperband":
        iterations = math.ceil(setup.target / hyperband_trials_per_iteration(setup.epochs))
        tuner = TrackedHyperband(max_epochs=setup.epochs, factor=HYPERBAND_FACTOR, hyperband_iterations=iterations,
                                 **common)
        tuner.oracle.hyperband_iterations = iterations  # a reloaded study may have been asked for fewer trials
    elif name == "bayesian":
        tuner = TrackedBayesianOptimization(max_trials=setup.target,
                                            num_initial_points=max(2, min(10, setup.target // 3)), **common)
    else:
        tuner = TrackedRandomSearch(max_trials=setup.target, **common)
    tuner.configure(setup, deadline)
    hypermodel.ready = True
    return tuner


# ---------------------------------------------------------------- the run


def run_kerastuner_search(config: SearchConfig) -> optuna_driver.SearchSummary:
    """Run Keras Tuner trials until the study has `trials` complete or pruned ones (or time runs out)."""
    from runners.device import configure_devices
    from search.environment import describe_environment

    setup = prepare(config)
    client = setup.client
    environment = describe_environment(configure_devices(config.mixed_precision))
    tracking.close_orphans(client, setup.experiment_id, live=set())
    parent = tracking.start_parent_run(client, setup.experiment_id, setup.study_name, invocation_settings(setup),
                                       environment, setup.space.text,
                                       {"budget": setup.space.budget,
                                        "params": {k: asdict(v) for k, v in setup.space.params.items()}})
    tracking.set_tags(client, parent, {"search.driver": "kerastuner"})
    summary = optuna_driver.SearchSummary(setup.study_name, str(setup.directory / setup.study_name),
                                          tracking.redact(setup.tracking_uri), parent, target=setup.target)
    with warnings.catch_warnings():
        # a continued Hyperband trial (and the best model) loads weights into a fresh optimiser on purpose
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        run_trials(setup, parent, environment, summary)
    if summary.stopped == "timeout":
        log.info(f"time budget of {setup.timeout:.0f} s reached after {summary.counted} of {setup.target} trials; "
                 "run the same command again to continue (--timeout 0 for no limit)")
    return summary


def run_trials(setup: TunerSetup, parent: str, environment: dict, summary) -> None:
    """The tuner's search to the target or the time limit; the parent run is closed whatever happens."""
    client = setup.client
    hypermodel = SpaceHyperModel(setup, parent, environment)
    tuner = make_tuner(setup, hypermodel, time.time() + setup.timeout if setup.timeout else None)
    status = "FINISHED"
    try:
        if counted(tuner.oracle) >= setup.target:
            log.info(f"study {setup.study_name} already has {counted(tuner.oracle)} of {setup.target} trials; "
                     "raise --trials to add more")
        tuner.search(verbose=0)
    except KeyboardInterrupt:
        status = "KILLED"
        if hypermodel.current:
            tracking.finish_trial_run(client, hypermodel.current.run_id, "KILLED", "interrupted (Ctrl-C)")
        raise
    except optuna_driver.SearchAborted:
        status = "FAILED"
        raise
    finally:
        summary.trials_run, summary.counted, summary.stopped = hypermodel.trials_run, counted(tuner.oracle), \
            tuner.stopped
        finish_invocation(setup, tuner, parent, summary, status)


def invocation_settings(setup: TunerSetup) -> dict:
    """What this invocation was asked to do, for the parent run's params."""
    c = setup.config
    return {"driver": "kerastuner", "tuner": c.tuner, "space": setup.space.name, "space_file": setup.space.source,
            "dataset": setup.dataset, "data_dir": c.data_dir, "trials_target": setup.target,
            "timeout": setup.timeout, "epochs": setup.epochs, "patience": setup.patience, "subset": setup.subset,
            "seed": c.seed, "breeds": c.breeds, "image_size": c.image_size,
            "kerastuner_dir": str(setup.directory / setup.study_name)}


def finish_invocation(setup: TunerSetup, tuner, parent: str, summary, status: str) -> None:
    """Record the best so far on the parent run, log the best model once, and close the parent run."""
    client = setup.client
    complete = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED" and t.score is not None]
    if complete:
        trial = max(complete, key=lambda t: t.score)
        summary.best_value, summary.best_trial = float(trial.score), int(trial.trial_id)
        summary.best_params = spaces.declare_hyperparameters(trial.hyperparameters.copy(), setup.space)
        tracking.log_metrics(client, parent, {"best_val_accuracy": trial.score, "trials_counted": summary.counted})
        tracking.set_tags(client, parent, {"search.best_trial": summary.best_trial,
                                           "search.best_params": json.dumps(summary.best_params, default=str)})
        if status == "FINISHED":
            log_best_model(setup, tuner, trial)
    tracking.set_tags(client, parent, {"search.stopped": summary.stopped})
    client.set_terminated(parent, status)


def log_best_model(setup: TunerSetup, tuner, trial) -> None:
    """Log the best trial's Keras model (Keras Tuner's best-epoch checkpoint) to its MLflow run, once."""
    runs = setup.client.search_runs(
        [setup.experiment_id], max_results=1,
        filter_string=f"tags.`optuna.trial_number` = '{int(trial.trial_id)}' and tags.`search.state` = 'COMPLETE'")
    if not runs or runs[0].data.tags.get("search.model_uri"):
        return
    uri = tracking.log_keras_model(setup.client, runs[0].info.run_id, tuner.load_model(trial))
    tracking.set_tags(setup.client, runs[0].info.run_id, {"search.model_uri": uri})
