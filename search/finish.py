"""The end of an invocation, for every driver: the best trial on the parent run, its model logged and
registered as `<study>-best`, the study report, the parent run closed."""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field

from search import tracking
from search.errors import SearchAborted
from search.setup import RunSetup, class_names

log = logging.getLogger("search")


@dataclass
class SearchSummary:
    """What one invocation did, for the caller and the final printout."""

    study_name: str
    storage: str
    tracking_uri: str
    parent_run_id: str
    trials_run: int = 0
    counted: int = 0
    refits: int = 0                      # refit rounds among the counted trials
    target: int = 0
    best_value: float | None = None
    best_params: dict = field(default_factory=dict)
    best_trial: int | None = None
    stopped: str = "target"
    stop_details: dict = field(default_factory=dict)
    budget_started: float | None = None  # time.time() the time budget began (SearchConfig.budget_started)
    ensemble: str | None = None          # the registered ensemble, when one beat the best trial (search/ensemble.py)


@dataclass
class BestTrial:
    """The most accurate feasible completed trial of a study, as any driver knows it."""

    number: int
    value: float
    params: dict
    run_id: str | None


@contextlib.contextmanager
def closed_invocation(finish):
    """Run the block, then `finish(status)` whatever happens: FINISHED, KILLED after Ctrl-C, FAILED when too many
    trials failed (the exception still goes up)."""
    status = "FINISHED"
    try:
        yield
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SearchAborted:
        status = "FAILED"
        raise
    finally:
        finish(status)


def finish_invocation(setup: RunSetup, parent: str, summary: SearchSummary, status: str, best: BestTrial | None,
                      study=None) -> None:
    """Record the best so far on the parent run, log and register its model, report, close the parent run.

    `study`: the Optuna study, for the report's importances and plots (None for another driver's study)."""
    client = setup.client
    setup.background.shutdown(wait=True)  # every trial's evaluation is logged and its run closed
    if best is not None:
        summary.best_value, summary.best_params, summary.best_trial = best.value, best.params, best.number
        tracking.log_metrics(client, parent, {"best_val_accuracy": best.value, "trials_counted": summary.counted})
        tracking.set_tags(client, parent, {"search.best_trial": best.number,
                                           "search.best_params": json.dumps(best.params, default=str)})
        try:  # results are for people: a failure here must not hide how the invocation ended
            log_best_model(setup, best)
            summary.ensemble = register_and_report(setup, parent, best, study)
        except Exception as err:
            log.warning(f"could not register the best model or write the study report: {type(err).__name__}: {err}")
    tracking.set_tags(client, parent, {"search.stopped": summary.stopped, **summary.stop_details})
    client.set_terminated(parent, status)


def register_and_report(setup: RunSetup, parent: str, best: BestTrial, study) -> str | None:
    """Register as `<study>-best` the ensemble of the kept trials when it beats the best trial on validation,
    else the best trial's kept model; write the study report (unless --no-report). Returns a line on the ensemble, or
    None."""
    from search import ensemble, registry, report
    from search.results import leaderboard

    keras_path = setup.models / f"trial-{best.number}.keras"
    combined = ensemble.build_and_log(setup, parent) if setup.data_cache else None
    said = None
    if combined is not None:
        found, run_id, path, image_size = combined
        version = registry.register_best(setup.client, setup.study_name, run_id, path, class_names(setup),
                                         image_size, f"ensemble {found.members_text()}", found.val_accuracy)
        said = (f"ensemble of trials {found.members_text()}: val {found.val_accuracy:.4f}, test "
                f"{found.test_accuracy:.4f} (models:/{version.name}/{version.version})")
        log.info(f"best model: models:/{version.name}/{version.version} (the ensemble)")
    elif keras_path.is_file() and setup.data_cache and best.run_id:
        version = registry.register_trial(setup.client, setup.study_name, best.run_id, keras_path,
                                          class_names(setup), best.number, best.value)
        log.info(f"best model: models:/{version.name}/{version.version} (trial {best.number})")
    if setup.config.report:
        table = leaderboard([setup.study_name], setup.tracking_uri)
        report.log_study_report(setup.client, setup.experiment_id, setup.study_name, study, table,
                                setup.workdir / "reports")
    return said


def log_best_model(setup: RunSetup, best: BestTrial) -> None:
    """Log the best trial's Keras model to its MLflow run, once."""
    path = setup.models / f"trial-{best.number}.keras"
    if not best.run_id or not path.is_file():
        return
    run = setup.client.get_run(best.run_id)
    if run.data.tags.get("search.model_uri"):
        return
    import keras

    # without its optimizer: a compiled model's learning-rate schedule (runners.train.BudgetedSchedule) would
    # make MLflow's keras flavour need this repository to load it
    uri = tracking.log_keras_model(setup.client, best.run_id, keras.models.load_model(path, compile=False))
    tracking.set_tags(setup.client, best.run_id, {"search.model_uri": uri})
