"""Hyperparameter search for image classifiers: Optuna (or Keras Tuner) suggests, runners/ train with Keras,
MLflow records. The path of data, one module a job:

    run.py        the command line, a thin layer over drivers.run_search(SearchConfig)
    config.py     SearchConfig and every tuning constant, with units; the numeric settings' ranges
    space.py      read and check a space file once; suggest_params, declare_hyperparameters
    setup.py      what every driver settles before trial one: space, runner, data, MLflow (ConfigError here)
    stores.py     Optuna storages and study lookup, MLflow store URIs
    plan.py       measure the machine, then plan what a time budget can hold
    drivers/      optuna_driver.py (the Optuna loop), kerastuner_driver.py (Keras Tuner over the same trials)
    sampling.py   samplers, pruners, objectives, constraints
    trial.py      one trial's lifecycle, for both drivers: MLflow run, runner, metrics, end state, kept models
    recovery.py   checkpoints, dead and interrupted trials taken over
    refit.py      the best configuration retrained for the rest of the budget
    stopping.py   failure streak, study patience, memory watch
    finish.py     the end of an invocation: best trial, registered model, report
    ensemble.py   greedy ensemble selection over the kept trials, registered when it beats the best
    tracking.py   MLflow calls
    results.py, tables.py, report.py, evaluation.py, registry.py, disk.py   what people read afterwards
    predict.py, breed_classifier.py   the registered model on photos
    bench/        benchmark commands that print tables

Importing the package sets what keeps the console readable, before anything imports TensorFlow or MLflow
(each only where it is not set already, so a user's own setting wins).
"""
import contextlib
import logging
import os
import sys

from runners.console import filtered_stderr

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow: keep its chatter out
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks the network at import otherwise
# MLflow draws a "Downloading artifacts" progress bar for every model it loads or registers, even a 1-file one
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__version__ = "0.1.0"


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message contains a given text; lets everything else through."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# Optuna's contour plot warns "[W ...] Param X unique value length is less than 2." whenever the trials that
# share two parameters agree on one of them (a conditional parameter, a short study): the report then leaves
# that panel empty, which is all the warning says. Only that message of that logger is dropped.
logging.getLogger("optuna.visualization._contour").addFilter(_DropMessage("unique value length is less than 2"))


class _FailedTrialInOneLine(logging.Filter):
    """Optuna logs a failed trial with its whole traceback; the trial lifecycle has already said why in one line
    (`trial N: failed: ...`) and recorded it in both stores, so the traceback goes. A trial claimed past the
    target by a race between workers (SurplusTrial) is no failure of the search: its record goes entirely."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "SurplusTrial" in record.getMessage():
            return False
        record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("optuna.study._optimize").addFilter(_FailedTrialInOneLine())

# What TensorFlow 2.21 writes to stderr while it is imported, whatever TF_CPP_MIN_LOG_LEVEL says: its C++
# logging is not initialised yet, so absl prints every message, with a warning saying so.
TENSORFLOW_NOISE = ("All log messages before absl::InitializeLog() is called",
                    "oneDNN custom operations are on",
                    "cpu_feature_guard.cc",
                    "To enable the following instructions:",
                    "rebuild TensorFlow with the appropriate compiler flags")


class _QuietTensorFlowImport:
    """A finder that wraps the first import of `tensorflow`, wherever it happens, in `filtered_stderr`
    (runners/console.py)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        import importlib.util

        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once is enough, and the real finders answer from here on
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            with filtered_stderr(TENSORFLOW_NOISE):
                run(module)

        loader.exec_module = exec_module
        return spec


def quiet_tensorflow_startup() -> None:
    """Keep TensorFlow's import-time messages (absl's InitializeLog warning, oneDNN's notice) off the console.

    oneDNN stays on (TF_ENABLE_ONEDNN_OPTS is left alone): it is what makes TensorFlow fast on these CPUs;
    only its notice is dropped. A no-op when TensorFlow is already imported."""
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowImport())
