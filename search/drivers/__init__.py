"""Who drives the search: Optuna (the default) or Keras Tuner, over the same trial lifecycle (search/trial.py).

    run_search(SearchConfig(...)) -> SearchSummary

Both drivers set up through search.setup.prepare_run first, so a configuration error answers in seconds,
before TensorFlow or Keras Tuner is imported.
"""
from __future__ import annotations

from search.config import SearchConfig, range_problems
from search.errors import ConfigError
from search.finish import SearchSummary

DRIVERS = ("optuna", "kerastuner")


def run_search(config: SearchConfig) -> SearchSummary:
    """Run (or resume) the search the config describes with its driver; ConfigError before any trial."""
    from dataclasses import asdict

    problems = range_problems(asdict(config))  # the command line checked them already; a notebook may not have
    if problems:
        raise ConfigError("; ".join(problems))
    if config.driver == "kerastuner":
        from search.setup import prepare_run

        check_kerastuner_flags(config)
        run = prepare_run(config, "-kerastuner")
        from search.drivers.kerastuner_driver import run_kerastuner_search

        return run_kerastuner_search(run)
    if config.driver != "optuna":
        raise ConfigError(f"unknown driver '{config.driver}'; available: {', '.join(DRIVERS)}")
    from search.drivers.optuna_driver import run_optuna_search

    return run_optuna_search(config)


def check_kerastuner_flags(config: SearchConfig) -> None:
    """What the Keras Tuner driver cannot do, said before anything is set up."""
    from search.sampling import refit_fraction

    tuners = ("hyperband", "bayesian", "random")
    if config.tuner not in tuners:
        raise ConfigError(f"unknown tuner '{config.tuner}'; available: {', '.join(tuners)}")
    if str(config.refit).strip().lower() != "auto" and refit_fraction(config, None, ["val_accuracy"]):
        raise ConfigError(f"--refit {config.refit}: the Keras Tuner driver has no refit phase; use --driver optuna "
                          "or leave --refit out")
