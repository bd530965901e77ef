"""Ensemble selection over a study's kept models: the greedy choice, the one Keras model, what gets registered."""
import json

import keras
import mlflow
import numpy as np
import optuna
from mlflow import MlflowClient

from search import ensemble, finish
from search.config import SearchConfig
from search.drivers import run_search
from search.setup import prepare_run
from conftest import ROOT, write_space


def one_hot_answers(right: np.ndarray, labels: np.ndarray, classes: int = 3) -> np.ndarray:
    """Where `right`: 0.8 on the true class; elsewhere a near miss, 0.5 on the next class and 0.3 on the true one."""
    answers = np.zeros((len(labels), classes))
    for i, (label, ok) in enumerate(zip(labels, right)):
        answers[i, label] = 0.8 if ok else 0.3
        if not ok:
            answers[i, (label + 1) % classes] = 0.5
        rest = answers[i] == 0
        answers[i, rest] = (1 - answers[i].sum()) / max(rest.sum(), 1)
    return answers


def test_greedy_selection_adds_the_member_that_fixes_the_others_mistakes_and_stops_at_the_best_round():
    labels = np.arange(12) % 3
    index = np.arange(12)
    val = {0: one_hot_answers(index < 8, labels),   # right on the first two thirds
           1: one_hot_answers(index >= 4, labels),  # right on the last two thirds; near misses elsewhere
           2: one_hot_answers(index < 4, labels)}   # right on the first third only
    counts = ensemble.greedy_selection(val, labels, rounds=5)
    assert set(counts) == {0, 1}  # together they are right everywhere; trial 2 adds nothing
    mean = sum(c * val[n] for n, c in counts.items()) / sum(counts.values())
    assert ensemble.accuracy(mean, labels) == 1.0
    assert ensemble.greedy_selection({0: val[0]}, labels) == {0: 1}


def test_a_transfer_studys_ensemble_is_one_keras_model_answering_as_its_members_average(dogs_dir, workdir, tmp_path):
    # heads on cached features only: a trial through the backbone (fine_tune) took a fifth of this test on AVX2
    lines = (ROOT / "spaces" / "transfer.yaml").read_text().splitlines()
    frozen_only = "  mode: frozen"
    space = write_space(tmp_path, "\n".join(frozen_only if line.startswith("  mode:") else line for line in lines
                                            if "when: {mode: [fine_tune]}" not in line))
    assert frozen_only in space.read_text().splitlines()
    config = SearchConfig(space=str(space), backbone="efficientnet_lite0", dataset="stanford_dogs",
                          data_dir=str(dogs_dir), breeds="4", subset=40, image_size=64, trials=4, epochs=2,
                          sampler="random", timeout=0, workdir=str(workdir))
    summary = run_search(config)
    setup = prepare_run(config, "", check=lambda space, budget: None)
    data = next(iter(setup.data_cache.values()))
    saved = sorted(setup.models.glob("trial-*.predictions.npz"))
    assert len(saved) >= 2  # every kept transfer trial saved its validation and test answers
    found = ensemble.select(setup.models, data)
    assert abs(sum(found.weights.values()) - 1) < 1e-9 and found.val_accuracy >= found.best_single[1]

    frozen = [p for p in saved if json.loads(str(np.load(p)["params"]))["mode"] == "frozen"]  # heads on cached features
    members = [int(p.name.split(".")[0].split("-")[1]) for p in frozen[:2]]
    assert len(members) == 2
    halves = {n: 0.5 for n in members}
    combined = ensemble.ensemble_model(setup.models, halves)
    images = data.splits["test"][0].astype("float32")
    own = {n: keras.models.load_model(setup.models / f"trial-{n}.keras", compile=False).predict(images, verbose=0)
           for n in members}
    answers = combined.predict(images, verbose=0)
    np.testing.assert_allclose(answers, sum(0.5 * own[n] for n in members), atol=1e-4)
    from runners import transfer

    shared = ensemble.ensemble_model(setup.models, halves, transfer)  # one backbone, two heads
    assert [layer.name for layer in shared.layers].count("efficientnet_lite0") == 1
    shared_answers = shared.predict(images, verbose=0)  # float32 pooling where the members' saved pool is bfloat16
    np.testing.assert_allclose(shared_answers, answers, atol=0.05)
    assert np.mean(shared_answers.argmax(axis=1) == answers.argmax(axis=1)) >= 0.9
    saved_answers = sum(0.5 * np.load(setup.models / f"trial-{n}.predictions.npz")["test"] for n in members)
    np.testing.assert_allclose(answers, saved_answers, atol=0.05)  # the trials' own answers (bfloat16 here)

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name(summary.study_name)

    def registered():
        runs = client.search_runs([experiment.experiment_id], "tags.`search.role` = 'ensemble'",
                                  order_by=["attributes.start_time DESC"])
        versions = client.search_model_versions(f"name = '{summary.study_name}-best'")
        return runs, max(versions, key=lambda v: int(v.version))

    runs, version = registered()
    if found.beats_best_single:  # the study registered the ensemble in the best trial's place
        assert len(runs) == 1 and version.tags["search.run_id"] == runs[0].info.run_id
    else:  # the best trial's own model
        assert not runs and version.tags["search.trial"] == str(summary.best_trial)

    # two kept trials made to disagree on validation (each right on its half): now the ensemble must win
    labels = data.splits["val"][1]
    first_half = np.arange(len(labels)) < len(labels) // 2
    for n, right in zip(members, (first_half, ~first_half)):
        path = setup.models / f"trial-{n}.predictions.npz"
        saved = dict(np.load(path))
        np.savez(path, **{**saved, "val": one_hot_answers(right, labels, classes=4)})
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{workdir}/optuna.db")
    best = study.best_trial
    finish.register_and_report(setup, summary.parent_run_id,
                               finish.BestTrial(best.number, best.value, best.params, best.user_attrs["mlflow_run_id"]),
                               study)
    runs, version = registered()
    assert version.tags["search.run_id"] == runs[0].info.run_id and version.tags["search.trial"].startswith("ensemble")
    assert runs[0].data.metrics["val_accuracy"] == 1.0
    finish.register_and_report(setup, summary.parent_run_id,  # the same ensemble again: no new run, no new version
                               finish.BestTrial(best.number, best.value, best.params, best.user_attrs["mlflow_run_id"]),
                               study)
    again_runs, again = registered()
    assert len(again_runs) == len(runs) and again.version == version.version
    photo = next(dogs_dir.rglob("*.jpg"))
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
    served = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}").predict([str(photo)])
    ensemble_keras = keras.models.load_model(setup.models / "ensemble.keras", compile=False)
    from runners.photos import decode_photo

    answer = ensemble_keras.predict(decode_photo(str(photo), 64)[None].astype("float32"), verbose=0)[0]
    assert served.loc[0, "breed"] == data.class_names[int(answer.argmax())]
    assert abs(served.loc[0, "probability"] - float(answer.max())) < 1e-4


def test_members_with_and_without_mirror_tta_share_one_backbone_layer_per_name():
    from runners import feature_heads
    from runners.backbones import BACKBONES, build_backbone, resolve_weights

    lite0 = BACKBONES["efficientnet_lite0"]
    params = {"backbone": "efficientnet_lite0", "mode": "frozen", "augmentation": "mirror", "pooling": "average",
              "dense_layers": 0, "dropout": 0.0}
    trials = []
    for index, tta in enumerate((False, True)):  # each trial's saved model holds its own copy of the backbone
        keras.utils.set_random_seed(index)
        backbone = build_backbone(lite0, 64, resolve_weights(lite0, 64, None))
        head = feature_heads.build_head(params, 1280, 3)
        trials.append((params, feature_heads.build_model([backbone], [lite0], head, params, 64, tta), 0.5))
    combined = feature_heads.ensemble_model(trials, 64)
    assert [layer.name for layer in combined.layers].count("efficientnet_lite0") == 1
    images = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    expected = sum(0.5 * model.predict(images, verbose=0) for _, model, _ in trials)
    np.testing.assert_allclose(combined.predict(images, verbose=0), expected, atol=1e-5)


def test_only_kept_models_of_the_best_ones_input_size_are_candidates(tmp_path):
    """An explored trial trained at a cheaper image size answers other photos: it cannot join the ensemble."""
    from types import SimpleNamespace

    labels = np.arange(12) % 3
    index = np.arange(12)
    answers = {0: (one_hot_answers(index < 8, labels), 32),   # the best alone
               1: (one_hot_answers(index >= 4, labels), 16),  # would complete it, but at 16 px
               2: (one_hot_answers(index >= 6, labels), 32)}
    for n, (val, size) in answers.items():
        (tmp_path / f"trial-{n}.keras").write_bytes(b"")
        np.savez(tmp_path / f"trial-{n}.predictions.npz", val=val, test=val, size=np.array(size))
    data = SimpleNamespace(splits={"val": (None, labels), "test": (None, labels)})
    found = ensemble.select(tmp_path, data)
    assert set(found.counts) <= {0, 2} and 0 in found.counts
    (tmp_path / "trial-2.keras").unlink()  # fell out of the kept models: one candidate of 32 px is left
    assert ensemble.select(tmp_path, data) is None
