"""Ensemble selection over a study's kept models: greedy forward selection on validation (Caruana et al. 2004,
as auto-sklearn does), registered as the study's model only when it beats the best single trial.

Every kept trial saved its answers on validation and test (mirror views averaged, as the test split is read)
beside its model (`models/<study>/trial-N.predictions.npz`, validation and test). Selection starts from
nothing and adds, with replacement, the kept trial that makes the average of the members' probabilities most
accurate on validation, for up to ENSEMBLE_ROUNDS rounds; the best round's members, weighted by how often
each was picked, make the ensemble. Test accuracy is computed for the report only, never to choose.

The ensemble is a Keras model of standard layers, so the registered pyfunc serves it as it serves one trial's
model. Where the runner can (transfer heads on cached features: `runners/feature_heads.py: ensemble_model`)
the members share their frozen backbones, each run once per view, and only their heads are several; else it
is each member's whole model, its answer scaled by its weight, summed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from search import tracking
from search.config import ENSEMBLE_ROUNDS

log = logging.getLogger("search")


@dataclass
class Ensemble:
    """The chosen members and how it scores."""

    counts: dict[int, int]         # trial number -> times greedy selection picked it
    val_accuracy: float
    best_single: tuple[int, float]  # (trial, validation accuracy) of the best kept member candidate
    test_accuracy: float
    test_top3_accuracy: float
    test_probabilities: np.ndarray

    @property
    def weights(self) -> dict[int, float]:
        """Trial number -> share of the average (sums to 1)."""
        return shares(self.counts)

    @property
    def beats_best_single(self) -> bool:
        """Whether the ensemble is more accurate on validation than the best single trial."""
        return self.val_accuracy > self.best_single[1] and len(self.weights) > 1

    def members_text(self) -> str:
        """'3 (50%), 7 (25%), 12 (25%)'."""
        return ", ".join(f"{n} ({w:.0%})" for n, w in sorted(self.weights.items(), key=lambda nw: -nw[1]))


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of class probabilities."""
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def greedy_selection(val: dict, labels: np.ndarray, rounds: int = ENSEMBLE_ROUNDS) -> dict:
    """Candidate (a trial number, or any sortable key) -> times picked: forward selection with replacement maximising validation accuracy of the mean.

    Each round adds the candidate whose addition is most accurate (ties: the lower log loss, then the lower
    trial number); the round with the best accuracy (earliest of equals) ends the selection."""
    total, counts, best, best_counts = None, {}, -1.0, {}
    rank = {n: i for i, n in enumerate(sorted(val))}  # ties go to the lowest key (trial number, or name)
    for size in range(1, rounds + 1):
        def score(n) -> tuple[float, float, int]:
            mean = (val[n] if total is None else total + val[n]) / size
            log_loss = -np.mean(np.log(np.clip(mean[np.arange(len(labels)), labels], 1e-7, 1.0)))
            return accuracy(mean, labels), -log_loss, -rank[n]

        chosen = max(val, key=score)
        total = val[chosen] if total is None else total + val[chosen]
        counts[chosen] = counts.get(chosen, 0) + 1
        if accuracy(total / size, labels) > best:
            best, best_counts = accuracy(total / size, labels), dict(counts)
    return best_counts


def shares(counts: dict) -> dict:
    """Times picked -> share of the average (sums to 1)."""
    picked = sum(counts.values())
    return {n: c / picked for n, c in counts.items()}


def combine(val: dict, test: dict, y_val: np.ndarray, y_test: np.ndarray) -> Ensemble:
    """The greedy ensemble of candidates' validation answers (`val`, key -> probabilities), scored on `test`."""
    val = {n: v.astype(np.float64) for n, v in val.items()}
    counts = greedy_selection(val, y_val)
    weights = shares(counts)
    singles = {n: accuracy(v, y_val) for n, v in val.items()}
    best_single = max(sorted(singles.items()), key=lambda ns: ns[1])
    answers = sum(w * test[n].astype(np.float64) for n, w in weights.items())
    top3 = np.argsort(answers, axis=1)[:, -3:]
    return Ensemble(counts, accuracy(sum(w * val[n] for n, w in weights.items()), y_val), best_single,
                    accuracy(answers, y_test), float(np.mean((top3 == y_test[:, None]).any(axis=1))), answers)


def select(folder: Path, data) -> Ensemble | None:
    """The ensemble of the kept trials in `folder` on `data`'s validation split; None with fewer than two.

    Candidates are the kept trials whose input size is the most accurate one's on validation (an explored trial
    at a cheaper image size answers photos of another size: it cannot share the ensemble's input)."""
    saved = {int(p.name.split(".")[0].split("-")[1]): p for p in folder.glob("trial-*.predictions.npz")}
    saved = {n: p for n, p in saved.items() if (folder / f"trial-{n}.keras").is_file()}
    arrays = {n: np.load(p) for n, p in saved.items()}
    y_val = data.splits["val"][1]
    if arrays:
        best = max(sorted(arrays), key=lambda n: accuracy(arrays[n]["val"], y_val))
        size = input_size(arrays[best])
        arrays = {n: a for n, a in arrays.items() if input_size(a) == size}
    if len(arrays) < 2:
        return None
    return combine({n: a["val"] for n, a in arrays.items()}, {n: a["test"] for n, a in arrays.items()},
                   y_val, data.splits["test"][1])


def input_size(saved) -> int | None:
    """The input size a candidate's model was saved with (None for predictions saved before it was recorded)."""
    return int(saved["size"]) if "size" in saved.files else None


def ensemble_model(folder: Path, weights: dict[int, float], runner=None):
    """One Keras model taking images: the runner's (`ensemble_model`: shared backbones, each member's head) when it
    has one for these members, else each member's whole model, its answer scaled by its weight, summed."""
    import json

    import keras
    from keras import layers

    members = {n: keras.models.load_model(folder / f"trial-{n}.keras", compile=False) for n in weights}
    build = getattr(runner, "ensemble_model", None)
    saved = {n: np.load(folder / f"trial-{n}.predictions.npz") for n in weights}
    if build is not None and all("params" in s.files for s in saved.values()):
        params = {n: json.loads(str(saved[n]["params"])) for n in weights}
        shared = build([(params[n], members[n], weights[n]) for n in weights],
                       int(next(iter(members.values())).input_shape[1]))
        if shared is not None:
            return shared
    first = next(iter(members.values()))
    inputs = keras.Input(first.input_shape[1:], name="image")
    answers = []
    for n, model in members.items():  # renamed: two members may carry the same model name
        member = keras.Model(model.inputs[0], model.outputs[0], name=f"trial_{n}")
        answers.append(layers.Rescaling(weights[n], name=f"weight_{n}")(member(inputs)))
    outputs = answers[0] if len(answers) == 1 else layers.Add(name="ensemble")(answers)
    return keras.Model(inputs, outputs, name="ensemble")


def build_and_log(setup, parent: str) -> tuple[Ensemble, str, Path, int] | None:
    """Select the ensemble of the kept trials; when it beats the best single trial, save its Keras model and
    record it as an MLflow run (`search.role=ensemble`) under the parent. (ensemble, run id, model path, its
    input size), or None when there is nothing to combine or the ensemble does not beat the best trial."""
    from search.setup import class_names

    data = next(iter(setup.data_cache.values()))  # the run's data (every trial's split is the same)
    found = select(setup.models, data)
    if found is None:
        return None
    if not found.beats_best_single:
        log.info(f"ensemble: not used, the best of the kept trials alone (trial {found.best_single[0]}, val "
                 f"{found.best_single[1]:.4f}) is as accurate on validation as any combination of them")
        return None
    path = setup.models / "ensemble.keras"
    same = registered_ensemble(setup, found)
    if same is not None and path.is_file():  # an earlier invocation (or a worker's restart) built this one
        log.info(f"ensemble: trials {found.members_text()}, as registered already (val {found.val_accuracy:.4f})")
        return found, same.tags["search.run_id"], path, int(same.tags["search.image_size"])
    model = ensemble_model(setup.models, found.weights, setup.runner)
    model.save(path)
    run_id = tracking.start_ensemble_run(setup.client, setup.experiment_id, parent, setup.study_name, {
        "val_accuracy": found.val_accuracy, "test_accuracy": found.test_accuracy,
        "test_top3_accuracy": found.test_top3_accuracy, "members": len(found.weights),
        "best_single_val_accuracy": found.best_single[1]}, {
        "search.ensemble_members": found.members_text(), "search.best_single_trial": str(found.best_single[0])})
    from search.evaluation import log_evaluation

    log_evaluation(setup.client, run_id, data.splits["test"][1], found.test_probabilities, class_names(setup))
    setup.client.set_terminated(run_id, "FINISHED")
    log.info(f"ensemble: trials {found.members_text()}: val {found.val_accuracy:.4f} against {found.best_single[1]:.4f} "
             f"for trial {found.best_single[0]} alone (test {found.test_accuracy:.4f})")
    return found, run_id, path, int(model.input_shape[1])


def registered_ensemble(setup, found: Ensemble):
    """The study's newest registered version when it is this very ensemble (same members, same weights), else None."""
    from search.registry import registered_name, versions

    newest = max(versions(setup.client, registered_name(setup.study_name)), key=lambda v: int(v.version), default=None)
    same = newest is not None and newest.tags.get("search.trial") == f"ensemble {found.members_text()}"
    return newest if same else None
