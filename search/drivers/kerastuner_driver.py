"""The Keras Tuner driver: Hyperband, Bayesian or random search over the same space files, trained through the
same trial lifecycle (search/trial.py) and runners as the Optuna driver.

    python -m search.run --space scratch_cnn --driver kerastuner --tuner hyperband --trials 30

The contract with Keras Tuner is its documented one for custom training: `SpaceHyperModel` declares the space
(`search.space.declare_hyperparameters`, the declaration Optuna reads too) and the tuner's `run_trial`
returns the objective, {"val_accuracy": best}. `run_trial` plans the trial and hands it to the lifecycle, so a
Keras Tuner trial is built, checked (`max_mflops`), trained, logged, kept and registered exactly as an Optuna
trial is, for every runner (scratch_cnn, transfer). Runs are tagged `optuna.study` and `optuna.trial_number`
(= Keras Tuner's trial index), so the leaderboard and `--compare` read both drivers alike.

How `--trials N` maps (conventions.md: N counts complete or pruned trials, failed ones do not):
- random, bayesian: `max_trials` is raised before each trial to N plus the failed trials so far.
- hyperband: `max_epochs` = `--epochs` (the space's budget), HYPERBAND_FACTOR, and as many Hyperband iterations
  as it takes to hold N trials; the search stops after N counted trials, inside an iteration if need be. A
  continued trial starts from its parent trial's weights (saved in the parent's Keras Tuner folder) and trains
  the epochs from `tuner/initial_epoch` to `tuner/epochs`, logged at those epoch numbers.
Keras Tuner's own state lives in `<workdir>/kerastuner/<study>/`; running the same command again
reloads it (overwrite=False) and goes on to the target, re-running a trial an interrupt cut short.
"""
from __future__ import annotations

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
from search import tracking
from search.config import BAYESIAN_STARTUP, HYPERBAND_FACTOR
from search.errors import SearchAborted
from search.finish import BestTrial, SearchSummary, closed_invocation, finish_invocation
from search.setup import RunSetup
from search.stopping import FailureStreak
from search.trial import TrialPlan, open_run, run_trial

log = logging.getLogger("search")
KT_VALUES = {"tuner/epochs": "kerastuner.epochs", "tuner/initial_epoch": "kerastuner.initial_epoch",
             "tuner/bracket": "kerastuner.bracket", "tuner/round": "kerastuner.round",
             "tuner/trial_id": "kerastuner.parent_trial"}
MODEL_FILE = "model.keras"  # a completed trial's model in its Keras Tuner folder, for Hyperband to continue


@dataclass(kw_only=True)
class TunerSetup(RunSetup):
    """The run's set-up and the Keras Tuner folder."""

    directory: Path


def prepare(run: RunSetup) -> TunerSetup:
    """The run's set-up (search.setup.prepare_run), checked for what Keras Tuner can express."""
    check_translation(run.space)
    return TunerSetup(**{f: getattr(run, f) for f in RunSetup.__dataclass_fields__},
                      directory=run.workdir / "kerastuner")


def check_translation(space: spaces.Space) -> None:
    """Declare the space on a fresh HyperParameters: what Keras Tuner cannot express is a SpaceError now."""
    if space.fidelity.get("resource") == "cost":
        raise spaces.SpaceError(f"{space.source}: Keras Tuner's Hyperband counts epochs, not work "
                                "(fidelity.resource: cost); use --driver optuna, or resource: epochs in a copy")
    try:
        spaces.declare_hyperparameters(kt.HyperParameters(), space)
    except (TypeError, ValueError) as err:
        raise spaces.SpaceError(f"{space.source}: Keras Tuner cannot express this space: {err}. Every choice "
                                "list must hold one type (int, float, str or bool); or use --driver optuna") from None


class SpaceHyperModel(kt.HyperModel):
    """A space file as a Keras Tuner HyperModel: it declares the parameters; the runner builds and trains."""

    def __init__(self, space: spaces.Space):
        super().__init__(name=space.name)
        self.space = space

    def declare_hyperparameters(self, hp):
        """The whole space, conditional parameters included, before the first trial."""
        spaces.declare_hyperparameters(hp, self.space)

    def build(self, hp):
        """Keras Tuner builds while it explores conditional scopes; our run_trial never uses this model."""
        spaces.declare_hyperparameters(hp, self.space)
        return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])


# ---------------------------------------------------------------- the tuners


class TrackedTrials:
    """Keras Tuner hooks: the study's target and time budget before each trial; each trial run through the
    shared trial lifecycle."""

    def configure(self, setup: TunerSetup, parent: str, environment: dict, deadline: float | None) -> None:
        """Remember the set-up, the parent run, the time limit and the failure limit."""
        self.setup, self.parent, self.environment, self.deadline = setup, parent, environment, deadline
        self.failures = FailureStreak(setup.config.max_failures)
        self.stopped, self.trials_run, self.running_run = "target", 0, None
        self.ends: dict[str, tuple[str, str | None]] = {}  # trial id -> (state, reason), this invocation

    def pre_create_trial(self):
        """Let the oracle create a trial only while the target is not met and time remains."""
        oracle = self.oracle
        remaining = self.setup.target - counted(oracle)
        if self.deadline is not None and time.time() >= self.deadline and remaining > 0:
            remaining, self.stopped = 0, "timeout"
        limit = len(oracle.trials) + max(remaining, 0)
        oracle.max_trials = limit if limit > 0 else -1  # 0 would mean "no limit" to Keras Tuner

    def run_trial(self, trial, *args, **kwargs):
        """Plan the trial from the tuner's values, run it through the lifecycle, return its objective."""
        from runners.callbacks import Progress

        setup, number = self.setup, int(trial.trial_id)
        params = spaces.declare_hyperparameters(trial.hyperparameters.copy(), setup.space)
        values = trial.hyperparameters.values
        # a continued Hyperband trial keeps its parent's seed and weights and trains the epochs after them
        parent_trial = values.get("tuner/trial_id")
        seed = setup.config.seed * 1000 + int(parent_trial if parent_trial is not None else number)
        last, first = int(values.get("tuner/epochs", setup.epochs)), int(values.get("tuner/initial_epoch", 0))
        tags = {"search.driver": "kerastuner", "search.source": f"kerastuner:{setup.config.tuner}",
                "search.device": self.environment.get("device", ""), "kerastuner.trial_id": trial.trial_id,
                **{tag: values[key] for key, tag in KT_VALUES.items() if key in values}}
        plan = TrialPlan(
            number, params, seed, last - first, setup.patience,
            context={"dataset": setup.dataset, "subset": setup.subset, "epochs_max": setup.epochs,
                     "patience": setup.patience, "seed": seed, "model": setup.space.model},
            tags=tags, progress=Progress(number, counted(self.oracle) + 1, setup.target, last, best_score(self.oracle),
                                         first_epoch=first),
            initial_weights=parent_model(self, parent_trial), first_epoch=first)
        run_id = reopen_run(setup, self.parent, number, tags) or open_run(setup, self.parent, plan)
        self.running_run, self.trials_run = run_id, self.trials_run + 1

        def on_end(state: str, reason: str) -> None:
            self.ends[trial.trial_id] = (state, reason)

        try:
            metrics, result = run_trial(setup, plan, run_id, on_end=on_end, ranking=lambda: ranking(self.oracle))
        finally:
            self.running_run = None
        self.ends[trial.trial_id] = ("COMPLETE", None)
        if isinstance(self, kt.Hyperband):  # a later round may continue this trial from its weights
            result.model.save(Path(self.get_trial_dir(trial.trial_id)) / MODEL_FILE)
        setup.runner.release(result)
        return {"val_accuracy": metrics["best_val_accuracy"]}

    def on_trial_end(self, trial):
        """Let Keras Tuner record the trial, stop after too many failures in a row."""
        state, reason = self.ends.get(trial.trial_id, ("FAIL", last_line(trial.message)))
        super().on_trial_end(trial)
        if self.failures.note(state, reason):
            self.stopped = "failures"
            raise SearchAborted(f"{self.failures.streak} trials failed in a row; the last one: {reason}")


class TrackedHyperband(TrackedTrials, kt.Hyperband):
    """Hyperband with MLflow runs and the study's stopping rules."""


class TrackedBayesianOptimization(TrackedTrials, kt.BayesianOptimization):
    """Bayesian optimisation (Gaussian process) with MLflow runs and the study's stopping rules."""


class TrackedRandomSearch(TrackedTrials, kt.RandomSearch):
    """Random search with MLflow runs and the study's stopping rules."""


def parent_model(tuner: TrackedTrials, parent_trial: str | None) -> str | None:
    """The saved model of the Hyperband trial this one continues, or None."""
    if parent_trial is None:
        return None
    path = Path(tuner.get_trial_dir(parent_trial)) / MODEL_FILE
    return str(path) if path.is_file() else None


def counted(oracle) -> int:
    """Trials that count toward the target: completed, or rejected before training (pruned)."""
    return sum(1 for t in oracle.trials.values()
               if t.status == "COMPLETED" or (t.status in ("FAILED", "INVALID")
                                              and ("TrialRejected" in (t.message or "")
                                                   or "ArchitectureError" in (t.message or ""))))


def completed(oracle) -> list:
    """The completed trials that have a score, in the order Keras Tuner made them."""
    return [t for t in oracle.trials.values() if t.status == "COMPLETED" and t.score is not None]


def best_score(oracle) -> float | None:
    """The best validation accuracy of a completed trial so far."""
    return max((t.score for t in completed(oracle)), default=None)


def ranking(oracle) -> list[tuple[float, int]]:
    """(val_accuracy, number) of the completed trials, for the kept models."""
    return [(float(t.score), int(t.trial_id)) for t in completed(oracle)]


def best_trial(setup: TunerSetup, oracle) -> BestTrial | None:
    """The most accurate completed trial, with its MLflow run."""
    complete = completed(oracle)
    if not complete:
        return None
    trial = max(complete, key=lambda t: t.score)
    runs = setup.client.search_runs(
        [setup.experiment_id], max_results=1,
        filter_string=f"tags.`optuna.trial_number` = '{int(trial.trial_id)}' and tags.`search.state` = 'COMPLETE'")
    return BestTrial(int(trial.trial_id), float(trial.score),
                     spaces.declare_hyperparameters(trial.hyperparameters.copy(), setup.space),
                     runs[0].info.run_id if runs else None)


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


def hyperband_trials_per_iteration(max_epochs: int, factor: int = HYPERBAND_FACTOR) -> int:
    """How many trials one Hyperband iteration runs (every bracket, every round), as Keras Tuner sizes them.

    Asks Keras Tuner's own (private) sizing methods, so the count cannot drift from what the oracle runs."""
    oracle = kt.oracles.HyperbandOracle(objective=kt.Objective("val_accuracy", "max"), max_epochs=max_epochs,
                                        factor=factor)
    return sum(oracle._get_size(b, r) for b in range(oracle._get_num_brackets()) for r in range(b + 1))


def make_tuner(setup: TunerSetup):
    """The chosen tuner over the space, its state under <workdir>/kerastuner/<study>/ (reloaded if there)."""
    from keras_tuner.src import config as kt_config

    kt_config.DEBUG = False  # its default prints a failed trial's traceback; the lifecycle logs one line instead
    common = dict(hypermodel=SpaceHyperModel(setup.space), objective=kt.Objective("val_accuracy", "max"),
                  seed=setup.config.seed, directory=str(setup.directory), project_name=setup.study_name,
                  overwrite=False, max_consecutive_failed_trials=10 ** 9)  # failures in a row are ours to count
    name = setup.config.tuner
    if name == "hyperband":
        iterations = math.ceil(setup.target / hyperband_trials_per_iteration(setup.epochs))
        tuner = TrackedHyperband(max_epochs=setup.epochs, factor=HYPERBAND_FACTOR, hyperband_iterations=iterations,
                                 **common)
        tuner.oracle.hyperband_iterations = iterations  # a reloaded study may have been asked for fewer trials
    elif name == "bayesian":
        least, most, per = BAYESIAN_STARTUP
        tuner = TrackedBayesianOptimization(max_trials=setup.target,
                                            num_initial_points=max(least, min(most, setup.target // per)), **common)
    else:
        tuner = TrackedRandomSearch(max_trials=setup.target, **common)
    return tuner


# ---------------------------------------------------------------- the run


def run_kerastuner_search(run: RunSetup) -> SearchSummary:
    """Run Keras Tuner trials until the study has `trials` complete or pruned ones (or time runs out)."""
    from runners.device import configure_devices
    from search.environment import describe_environment

    setup = prepare(run)
    config = setup.config
    client = setup.client
    environment = describe_environment(configure_devices(config.mixed_precision))
    tracking.close_orphans(client, setup.experiment_id, live=set())
    parent = tracking.start_parent_run(client, setup.experiment_id, setup.study_name, invocation_settings(setup),
                                       environment, setup.space.text,
                                       {"budget": setup.space.budget,
                                        "params": {k: asdict(v) for k, v in setup.space.params.items()}})
    tracking.set_tags(client, parent, {"search.driver": "kerastuner"})
    summary = SearchSummary(setup.study_name, str(setup.directory / setup.study_name),
                            tracking.redact(setup.tracking_uri), parent, target=setup.target)
    tuner = make_tuner(setup)
    tuner.configure(setup, parent, environment, time.time() + setup.timeout if setup.timeout else None)

    def finish(status: str) -> None:
        summary.trials_run, summary.counted, summary.stopped = tuner.trials_run, counted(tuner.oracle), tuner.stopped
        setup.background.shutdown(wait=True)  # every completed trial's run is closed before the best is looked up
        finish_invocation(setup, parent, summary, status, best_trial(setup, tuner.oracle))

    with closed_invocation(finish):
        if counted(tuner.oracle) >= setup.target:
            log.info(f"study {setup.study_name} already has {counted(tuner.oracle)} of {setup.target} trials; "
                     "raise --trials to add more")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            tuner.search(verbose=0)
    if summary.stopped == "timeout":
        log.info(f"time budget of {setup.timeout:.0f} s reached after {summary.counted} of {setup.target} trials; "
                 "run the same command again to continue (--timeout 0 for no limit)")
    return summary


def invocation_settings(setup: TunerSetup) -> dict:
    """What this invocation was asked to do, for the parent run's params."""
    c = setup.config
    return {"driver": "kerastuner", "tuner": c.tuner, "space": setup.space.name, "space_file": setup.space.source,
            "dataset": setup.dataset, "data_dir": c.data_dir, "trials_target": setup.target,
            "timeout": setup.timeout, "epochs": setup.epochs, "patience": setup.patience, "subset": setup.subset,
            "seed": c.seed, "breeds": c.breeds, "image_size": c.image_size,
            "kerastuner_dir": str(setup.directory / setup.study_name)}
