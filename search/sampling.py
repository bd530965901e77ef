"""How Optuna chooses: samplers, pruners, objectives and constraints, each made from the run's settings.

Every number here comes from search/config.py; a bad name or value is a ConfigError before the first trial.
"""
from __future__ import annotations

import os
import socket
import zlib

import numpy as np
import optuna
from optuna.trial import TrialState

from search import space as spaces
from search.config import (HYPERBAND_FACTOR, MEDIAN_STARTUP_TRIALS, MEDIAN_WARMUP_EPOCHS, NEAR_DEFAULT_CHANGES,
                           NEAR_DEFAULT_SPREAD, OBJECTIVES, REFIT_AUTO, REFIT_MAX, TPE_STARTUP, SearchConfig)
from search.errors import ConfigError
from search.fidelity import rung_range, steps

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts toward --trials


def startup_trials(target: int) -> int:
    """TPE's start-up trials for a study of `target` trials (TPE_STARTUP)."""
    least, most, per = TPE_STARTUP
    return max(least, min(most, target // per))


def make_sampler(name: str, seed: int, space: spaces.Space, target: int) -> optuna.samplers.BaseSampler:
    """tpe | random | grid | cmaes, seeded (TPE reads the constraints trials set, see search.trial)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(target))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(spaces.grid_of(space), seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ConfigError(f"unknown sampler '{name}'; available: tpe, random, grid, cmaes")


def near_default(space: spaces.Space, rng: np.random.Generator) -> dict:
    """A perturbation of the space's default configuration: NEAR_DEFAULT_CHANGES of its searched parameters,
    drawn at random, move (a number by a normal step of NEAR_DEFAULT_SPREAD of its (log) range, rounded to its
    step and kept in range; a choice to another one at random); the rest keep their defaults. Conditions are
    followed as the values are set, so a parameter that becomes active takes its default."""
    default = spaces.default_params(space)
    searched = [p.name for p in space.params.values() if p.type != "fixed"
                and not (p.type == "categorical" and len(p.choices) < 2) and p.active(default)]
    moving = set(rng.choice(searched, size=min(NEAR_DEFAULT_CHANGES, len(searched)), replace=False))
    params: dict = {}
    for p in space.params.values():
        if not p.active(params):
            continue
        if p.name not in moving:
            params[p.name] = p.value if p.type == "fixed" else p.default
        elif p.type == "categorical":
            others = [c for c in p.choices if c != p.default]
            params[p.name] = others[rng.integers(len(others))]
        else:
            params[p.name] = moved_number(p, rng)
    return params


def moved_number(p: spaces.Param, rng: np.random.Generator):
    """A number parameter's default moved by a normal step of NEAR_DEFAULT_SPREAD of its range (log range if log)."""
    scale = np.log if p.log else (lambda v: v)
    low, high, start = scale(p.low), scale(p.high), scale(p.default)
    moved = float(np.clip(start + rng.normal(0, NEAR_DEFAULT_SPREAD * (high - low)), low, high))
    value = float(np.exp(moved)) if p.log else moved
    if p.step:
        value = p.low + round((value - p.low) / p.step) * p.step
    value = min(max(value, p.low), p.high)
    return int(round(value)) if p.type == "int" else value


def sampler_seed(seed: int, trials_so_far: int, shared: bool) -> int:
    """The sampler's seed for this process: --seed on a fresh study run by one process; otherwise one mixed
    from it, the trials already in the study and this process, so a resumed, restarted or parallel worker
    does not replay the suggestions (random ones, TPE's start-up ones) the study has already tried."""
    if not trials_so_far and not shared:
        return seed
    parts = [seed, trials_so_far] + ([os.getpid(), zlib.crc32(socket.gethostname().encode())] if shared else [])
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def make_pruner(name: str, epochs: int, min_epochs: int = 1, factor: int = HYPERBAND_FACTOR,
                resource: str = "epochs") -> optuna.pruners.BasePruner:
    """median | hyperband | sha | none, over the space's `fidelity.resource` (epochs, or work: search/fidelity.py)."""
    low, high = rung_range(resource, epochs, min_epochs)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS,
                                           n_warmup_steps=steps(resource, MEDIAN_WARMUP_EPOCHS))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=low, max_resource=high, reduction_factor=factor)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=low, reduction_factor=factor)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner '{name}'; available: auto, median, hyperband, sha, none")


def pruner_name(config: SearchConfig, timeout: float | None, objectives: list[str]) -> str:
    """The pruner a run uses: `auto` is Hyperband when time is the budget (most trials stop after a few cheap
    epochs, the promising ones train long), else median; a multi-objective study cannot prune (Optuna)."""
    if len(objectives) > 1:
        if config.pruner not in ("auto", "none"):
            raise ConfigError(f"--pruner {config.pruner}: Optuna cannot prune a multi-objective study "
                              f"(--objectives {','.join(objectives)}); leave --pruner out")
        return "none"
    if config.pruner == "auto":
        return "hyperband" if timeout else "median"
    return config.pruner


def refit_fraction(config: SearchConfig, timeout: float | None, objectives: list[str],
                   space_refit: float | None = None) -> float:
    """The fraction of --timeout kept for the refit: `auto` is the space's `budget.refit` (else REFIT_AUTO) when
    time is the budget and the study has one objective (there is then one best configuration to retrain), else 0;
    a bad fraction is a ConfigError."""
    if str(config.refit).strip().lower() == "auto":
        wanted = REFIT_AUTO if space_refit is None else space_refit
        return wanted if timeout and len(objectives) == 1 else 0.0
    try:
        fraction = float(config.refit)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0 <= fraction <= REFIT_MAX:  # NaN fails too
        raise ConfigError(f"--refit {config.refit}: give a fraction of --timeout between 0 and {REFIT_MAX} "
                          "(0 = no refit), or auto")
    if fraction and len(objectives) > 1:
        raise ConfigError(f"--refit {config.refit}: a multi-objective study (--objectives {config.objectives}) has a "
                          "Pareto front, not one best configuration to retrain; leave --refit out or give 0")
    return fraction


def parse_objectives(text: str) -> list[str]:
    """--objectives as a list starting with val_accuracy; unknown names list the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names or names[0] != "val_accuracy" or len(set(names)) != len(names):
        raise ConfigError(f"--objectives {text}: give val_accuracy first, then any of "
                          f"{', '.join(n for n in OBJECTIVES if n != 'val_accuracy')} (each once)")
    return names


def constraint_values(config: SearchConfig, metrics: dict) -> dict[str, float]:
    """How far a model is over each limit the run set (<= 0: within it), by the option's name."""
    values = {}
    if config.max_params:
        values["max_params"] = float(metrics.get("param_count") or 0) - config.max_params
    if config.max_inference_ms:
        values["max_inference_ms"] = float(metrics.get("inference_ms") or 0) - config.max_inference_ms
    return values


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """True when the trial meets --max-params and --max-inference-ms (or there are none)."""
    return all(v <= 0 for v in trial.constraints.values())


def count(study: optuna.Study) -> int:
    """Trials that count toward the target: complete or pruned."""
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def best_value(study: optuna.Study) -> float | None:
    """The study's best validation accuracy so far, or None."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max((t.values[0] for t in complete if feasible(t)), default=None)
