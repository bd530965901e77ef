"""The refit phase: retrain the best explored configuration for the rest of the time budget.

Exploration finds a configuration in short trials; the refit trains it again, unpruned, for as many epochs as
the time left holds (planned from its measured epoch time, REFIT_EPOCH_MARGIN slower), as one or two rounds
(the second a warm restart from the first's weights, see REFIT_ROUND_END). When exploration's best is not the
space's default, round 1 is a race between the two, each trained for half of it; the winner on validation goes on
to round 2. Rounds are ordinary trials of the study (MLflow run, checkpoints, leaderboard, best model), tagged
`refit_of` (and `race`). Constants: search/config.py.
"""
from __future__ import annotations

import copy
import logging
import time

import optuna
from optuna.trial import TrialState

from search import space as spaces
from search import tracking
from search.config import PLAN_SLACK, REFIT_EPOCH_MARGIN, REFIT_ROUND_END
from search.plan import full_epoch_seconds, measured_refit_seconds
from search.recovery import DiscardCheckpoint
from search.sampling import feasible

log = logging.getLogger("search")


def best_explored(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The explored (not refit) complete feasible trial with the best validation accuracy, or None."""
    explored = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if feasible(t) and t.user_attrs.get("refit_of") is None]
    return max(explored, key=lambda t: t.values[0], default=None)


def refit_epoch_seconds(best: optuna.trial.FrozenTrial) -> float | None:
    """What one refit epoch of `best` is planned to take: its epochs' mean plus REFIT_EPOCH_MARGIN; None when
    `best` recorded no timings."""
    ran = best.user_attrs.get("epochs_run") or len(best.intermediate_values)
    if best.user_attrs.get("refit_epoch_seconds") and ran:  # measured at the refit's data size (refit_best)
        return best.user_attrs["refit_epoch_seconds"]
    per_epoch = best.user_attrs.get("epoch_seconds")
    if not per_epoch and best.user_attrs.get("train_seconds") and ran:  # trials recorded before epoch_seconds
        per_epoch = best.user_attrs["train_seconds"] / ran
    if not per_epoch or not ran:
        return None
    full, trained = best.user_attrs.get("full_train_images"), best.user_attrs.get("train_images")
    if full and trained and trained < full:  # explored on part of the training images: the refit trains on all
        per_epoch = full_epoch_seconds(per_epoch, trained, full, best.user_attrs.get("val_images") or 0)
    return per_epoch * REFIT_EPOCH_MARGIN  # so a slower stretch of a shared machine still ends inside the budget


def refit_plan(best: optuna.trial.FrozenTrial, remaining: float) -> tuple[int, float] | None:
    """(epochs, expected seconds) of a refit of `best` that fills `remaining` seconds, never fewer epochs than
    `best` ran; None when `best` recorded no timings.

    An epoch costs refit_epoch_seconds; building the model and the test pass cost what they cost `best` (its
    trial seconds beyond its training seconds), once."""
    per_epoch = refit_epoch_seconds(best)
    if per_epoch is None:
        return None
    ran = best.user_attrs.get("epochs_run") or len(best.intermediate_values)
    fixed = setup_seconds(best)
    epochs = max(ran, int((remaining - fixed) // per_epoch))
    return epochs, fixed + epochs * per_epoch


def refit_fits(trial: optuna.trial.FrozenTrial, seconds: float) -> bool:
    """Whether a refit of `trial` (at least the epochs it was explored for) is planned to end within `seconds`."""
    plan = refit_plan(trial, seconds)
    return plan is not None and plan[1] <= seconds


def one_epoch_seconds(best: optuna.trial.FrozenTrial) -> float:
    """What a refit of `best` that trains a single epoch is expected to take, set-up and test pass included."""
    return setup_seconds(best) + refit_epoch_seconds(best)


def one_epoch_fits(best: optuna.trial.FrozenTrial, remaining: float) -> bool:
    """Whether a refit of `best` can train at least one epoch in `remaining` seconds."""
    return one_epoch_seconds(best) <= remaining


def setup_seconds(trial: optuna.trial.FrozenTrial) -> float:
    """What a refit of `trial` spends besides training: building its model (as the trial did) and the evaluation
    (as the trial's, or, for a screen that was not tested, as planned from timed steps)."""
    spent = max(0.0, (trial.user_attrs.get("trial_seconds") or 0.0) - (trial.user_attrs.get("train_seconds") or 0.0))
    return spent + trial.user_attrs.get("refit_evaluation_seconds", 0.0)


def refit_rounds(best: optuna.trial.FrozenTrial, timeout: float, elapsed: float, remaining: float) -> list[float]:
    """Seconds for each round of the refit: one round for the time left, or, when the refit starts before
    REFIT_ROUND_END of the timeout and `best`'s epochs fit twice, a first round that ends there and a second
    one (a warm restart from the first's weights) for the rest."""
    first = timeout * REFIT_ROUND_END - elapsed
    if first <= 0 or not refit_fits(best, first) or remaining - first < first:
        return [remaining]
    return [first, remaining - first]


def refit_best(setup, parent: str, objective, remaining: float, elapsed: float = 0.0) -> None:
    """Train the best explored configuration once more, for the time exploration left, as one or two trials.

    Each round's epoch count (user attr `epochs`) makes its learning-rate schedule span its time; a second
    round starts from the first one's weights (user attr `continues`), as a warm restart does. With two rounds
    and a best that is not the space's default, round 1 is a race (see `race`). Rounds go through the same
    objective as every trial (MLflow run, checkpoints, leaderboard, best model), unpruned."""
    started = time.monotonic()  # `remaining` counts from here: timing steps below spends some of it
    study = setup.study
    best = best_explored(study)
    if best is None or remaining <= 0:
        log.info("refit: skipped, " + ("no complete trial to retrain" if best is None
                                       else f"exploration used the whole {setup.timeout:.0f} s"))
        return
    busy = (TrialState.WAITING, TrialState.RUNNING)
    if any(t.user_attrs.get("refit_of") == best.number for t in study.get_trials(deepcopy=False, states=busy)):
        log.info(f"refit: trial {best.number}'s configuration is already being refit by another worker")
        return
    if refit_plan(best, remaining) is None:
        log.info(f"refit: skipped, trial {best.number} recorded no epoch timings")
        return
    best = planned_from_steps(setup, best)
    remaining -= time.monotonic() - started
    if not one_epoch_fits(best, remaining):  # its first epoch would end past the budget and teach nothing new
        log.info(f"refit: skipped, one epoch of trial {best.number}'s configuration (~{one_epoch_seconds(best):.0f} s) "
                 f"does not fit in the {remaining:.0f} s left")
        return
    started, elapsed = time.monotonic(), elapsed + time.monotonic() - started
    rounds = refit_rounds(best, setup.timeout, elapsed, remaining)
    rival = default_rival(setup, best) if len(rounds) > 1 else None
    if rival is not None:  # timing its steps spent some of round 1
        rounds[0] -= time.monotonic() - started
        started = time.monotonic()
        if not race_fits([best, rival], rounds[0]):  # a race that trains neither would leave no model at all
            log.info(f"refit: no race, round 1's {rounds[0]:.0f} s cannot hold a refit of both trial {best.number}'s "
                     f"and trial {rival.number}'s (the space's default) configurations; trial {best.number}'s alone")
            rival = None
    previous = None
    for index in range(1, len(rounds) + 1):
        seconds = started + sum(rounds[:index]) - time.monotonic()  # to this round's end, as earlier ones ran
        if index > 1 and (previous is None or seconds <= 0 or not refit_fits(best, seconds)):
            log.info("refit: no second round, " + ("the first did not complete" if previous is None
                                                     else "too little time left for it"))
            return
        if index == 1 and rival is not None:
            previous, best = race(setup, parent, objective, [best, rival], seconds, len(rounds))
            continue
        previous = run_round(setup, parent, objective, best, previous, index, len(rounds), seconds)


def planned_from_steps(setup, trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """`trial`, with a refit's epoch (and, untested, evaluation) seconds timed from a few full training steps when
    it was explored on part of the images (or smaller ones, or a narrower model), or was not tested: its epochs
    say little of a full one and nothing of the evaluation."""
    if not ((trial.user_attrs.get("train_images") or 0) < (trial.user_attrs.get("full_train_images") or 0)
            or trial.user_attrs.get("cheaper_fidelity") or trial.user_attrs.get("test_accuracy") is None):
        return trial
    trial = copy.deepcopy(trial)  # a finished trial is read-only in the study: the plan lives on this copy
    epoch, evaluation = measured_refit_seconds(setup, spaces.complete_params(setup.space, trial.params))
    trial.user_attrs["refit_epoch_seconds"] = epoch
    if trial.user_attrs.get("test_accuracy") is None:
        trial.user_attrs["refit_evaluation_seconds"] = evaluation
    return trial


def default_rival(setup, best: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial | None:
    """The explored trial of the space's default configuration, when it completed and is not `best`: the rival
    `best` races in round 1 (None: no race)."""
    default = next((t for t in setup.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.user_attrs.get("source") == "default" and t.user_attrs.get("refit_of") is None), None)
    if default is None or default.number == best.number or default.params == best.params:
        return None
    return planned_from_steps(setup, default) if refit_plan(default, 1.0) is not None else None


def race_fits(contenders: list, seconds: float) -> bool:
    """Whether an equal share of `seconds` holds a refit of each contender (at least the epochs it was explored for)."""
    return all(refit_fits(c, seconds / len(contenders)) for c in contenders)


def race(setup, parent: str, objective, contenders: list, seconds: float, rounds: int):
    """Round 1 as a race: each contender (the best explored configuration, the space's default) trains for an equal
    share of the round's time, fully, with its schedule annealed by its end; the one more accurate on validation
    goes on to round 2. A short comparison favours configurations that learn fast over a few dozen steps (small
    batches, cheap models: on CIFAR-10 such screens won 4-epoch comparisons and lost their refits by 7-14 points
    to the default); a few full epochs each, annealed, judge them nearer the refit's horizon.
    Returns (the winner's round-1 trial, the explored trial it refits), or (None, the best) when none completed."""
    started = time.monotonic()
    names = " and ".join(f"trial {c.number}'s" + (" (the space's default)" if c.user_attrs.get("source") == "default"
                                                   else "") for c in contenders)
    log.info(f"refit: round 1 of {rounds} is a race: {names} configurations, ~{seconds / len(contenders):.0f} s each; "
             "the more accurate on validation goes on")
    finished = []
    for index, contender in enumerate(contenders, start=1):
        share = started + seconds * index / len(contenders) - time.monotonic()
        if not refit_fits(contender, share):
            log.info(f"refit: trial {contender.number}'s configuration does not fit its share of the race")
            continue
        done = run_round(setup, parent, objective, contender, None, 1, rounds, share, race=True)
        if done is not None:
            finished.append((done, contender))
    if not finished:
        return None, contenders[0]
    winner, contender = max(finished, key=lambda pair: pair[0].values[0])
    log.info(f"refit: trial {winner.number} (trial {contender.number}'s configuration) wins the race with validation "
             f"accuracy {winner.values[0]:.4f}" + "".join(f" against {t.values[0]:.4f} (trial {t.number})"
                                                         for t, _ in finished if t.number != winner.number))
    return winner, contender


def run_round(setup, parent: str, objective, best, previous, index: int, rounds: int, seconds: float,
              race: bool = False) -> optuna.trial.FrozenTrial | None:
    """One refit round of `best`'s configuration ending `seconds` from now (from `previous`'s weights, when given):
    the trial if it completed, else None."""
    epochs, planned = refit_plan(best, seconds)
    label = f"round {index} of {rounds}: " if rounds > 1 else ""
    start = f", starting from trial {previous.number}'s weights" if previous is not None else ""
    log.info(f"refit: {label}trial {best.number}'s configuration for about {epochs} epochs (~{planned:.0f} s)"
             f"{start}; {scheduled(epochs)} scheduled, the schedule ending with the last that fits")
    tracking.set_tags(setup.client, parent, {"search.refit_of": best.number, "search.refit_epochs": epochs,
                                             "search.refit_planned_seconds": round(planned),
                                             "search.refit_rounds": rounds})
    # training stops at the round's end less the evaluation, however slow its epochs turn out (Deadline)
    attrs = {"source": "refit", "refit_of": best.number, "epochs": scheduled(epochs), "refit_round": index,
             "deadline": time.time() + seconds - setup_seconds(best)}
    if race:
        attrs["race"] = True
    if previous is not None:
        attrs.update(continues=previous.number, epochs_before=previous.user_attrs.get("epochs_run", 0)
                     + previous.user_attrs.get("epochs_before", 0))
    return run_refit_trial(setup, objective, best.params, attrs)


def scheduled(epochs: int) -> int:
    """The epochs a refit round's schedule is planned over: PLAN_SLACK more than its plan says fit (the Deadline
    ends the schedule with the last epoch that fits, earlier or later)."""
    return max(epochs, int(epochs * PLAN_SLACK))


def run_refit_trial(setup, objective, params: dict, attrs: dict) -> optuna.trial.FrozenTrial | None:
    """Enqueue one refit trial, claim it, run it through the objective; the trial if it completed, else None."""
    study = setup.study
    study.enqueue_trial(params, user_attrs=attrs)
    queued = max((t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                  if t.user_attrs.get("refit_of") == attrs["refit_of"]), key=lambda t: t.number)
    if not study._storage.set_trial_state_values(queued._trial_id, state=TrialState.RUNNING):
        log.info(f"refit: trial {queued.number} was taken by another worker")
        return None
    # Optuna runs the first waiting trial of the queue, which may be a baseline or warm start exploration left:
    # this one call runs the refit trial claimed above instead
    study._pop_waiting_trial_id = lambda: queued._trial_id
    try:
        study.optimize(objective, n_trials=1, callbacks=[DiscardCheckpoint(setup.checkpoints)],
                       catch=(Exception,))
    finally:
        del study._pop_waiting_trial_id
    done = study._storage.get_trial(queued._trial_id)
    return done if done.state == TrialState.COMPLETE else None


def refit_default(setup, parent, objective, remaining: float, epochs: int, planned: float) -> None:
    """Train the space's default configuration for the whole budget, as one refit trial (`refit_of` "default"):
    what a run does when exploring cannot pay on this machine (search/plan.py)."""
    log.info(f"refit: the space's default configuration for about {epochs} epochs (~{planned:.0f} s), no exploration; "
             f"{scheduled(epochs)} scheduled, the schedule ending with the last that fits")
    tracking.set_tags(setup.client, parent, {"search.refit_of": "default", "search.refit_epochs": epochs,
                                             "search.refit_planned_seconds": round(planned), "search.refit_rounds": 1})
    attrs = {"source": "refit", "refit_of": "default", "epochs": scheduled(epochs), "refit_round": 1,
             "deadline": time.time() + remaining}
    run_refit_trial(setup, objective, spaces.default_params(setup.space), attrs)
