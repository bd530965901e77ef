"""The registered best model: a pyfunc that predicts real photos from a path, bytes or HTTP, without this repo."""
import base64
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import TINY_SPACE, shared, write_space
from search.config import SearchConfig
import search.predict
from search.predict import main
from search.drivers import run_search
from search.tracking import fluent_api

NAME = "tiny-cifar10"
MODEL = f"{NAME}-best"
VENV_BIN = Path(sys.executable).parent


@dataclass
class Registered:
    """A study whose best model was registered, and real photos to show it."""

    config: SearchConfig
    summary: object
    uri: str
    dog: Path
    cat: Path

    def args(self, *more: str) -> list[str]:
        return ["--tracking-uri", self.uri, *more]


@pytest.fixture(scope="module")
def registered(cifar_dir, tmp_path_factory) -> Registered:
    """Two tiny CIFAR-10 trials, then a Stanford Dogs photo and a CIFAR-10 test JPEG to predict."""
    root = tmp_path_factory.mktemp("predict")
    config = SearchConfig(space=str(write_space(root, TINY_SPACE)), data_dir=str(cifar_dir), trials=2,
                          sampler="random", workdir=str(root / "mlruns"), keep_models=1)  # one model: no ensemble
    summary = run_search(config)
    dog = next(shared("stanford_dogs", "Images", "n02085620-Chihuahua").glob("*.jpg"))
    cat = root / "cat.jpg"
    with zipfile.ZipFile(shared("cifar10", "cifar10-jpeg.zip")) as archive:
        cat.write_bytes(archive.read("test/cat/0000.jpg"))
    return Registered(config, summary, f"sqlite:///{root}/mlruns/mlflow.db", dog, cat)


def predicted(capsys, argv: list[str], code: int = 0) -> tuple[str, str]:
    assert main(argv) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_the_best_trial_is_registered_as_study_best_with_its_trial_and_accuracy(registered):
    versions = MlflowClient(registered.uri).search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["search.trial"] == str(registered.summary.best_trial)
    assert float(tags["search.val_accuracy"]) == pytest.approx(registered.summary.best_value, abs=1e-6)
    assert tags["search.image_size"] == "32" and tags["search.classes"] == "10"


def test_a_new_invocation_with_the_same_best_adds_no_version(registered):
    run_search(registered.config)  # the study already has its trials: only the end-of-invocation steps run
    assert len(MlflowClient(registered.uri).search_model_versions(f"name = '{MODEL}'")) == 1


def test_predict_prints_the_top_breeds_of_each_photo(registered, capsys):
    out, _ = predicted(capsys, registered.args(str(registered.dog), str(registered.cat), "--top", "3"))
    lines = out.splitlines()
    assert lines[0] == str(registered.dog) and lines[4] == str(registered.cat)
    assert [line.strip()[:2] for line in lines[1:4]] == ["1.", "2.", "3."]
    classes = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
    assert lines[1].split()[1] in classes and lines[1].endswith("%")


def test_json_gives_ranked_probabilities_from_the_named_version(registered, capsys):
    out, _ = predicted(capsys, registered.args(str(registered.cat), "--json", "--top", "10",
                                               "--model", f"models:/{MODEL}/1"))
    answer = json.loads(out)
    assert answer["model"] == f"models:/{MODEL}/1"
    guesses = answer["images"][0]["predictions"]
    probabilities = [g["probability"] for g in guesses]
    assert len(guesses) == 10 and probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)


def test_bad_inputs_get_a_message_each_and_the_rest_are_still_predicted(registered, capsys, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    out, _ = predicted(capsys, registered.args(str(tmp_path / "missing.jpg"), str(text), str(registered.dog)),
                       code=1)  # issue #27: any failed input exits 1, after the good ones are predicted
    assert f"{tmp_path / 'missing.jpg'}: cannot predict: no such file" in out
    assert f"{text}: cannot predict: not an image" in out
    assert f"{registered.dog}\n  1. " in out


def test_nothing_predictable_exits_1(registered, capsys, tmp_path):
    out, _ = predicted(capsys, registered.args(str(tmp_path / "missing.jpg")), code=1)
    assert "no such file" in out


@pytest.fixture
def album(registered, tmp_path) -> Path:
    """A folder of real photos in sub-folders, with files and folders a walk must skip."""
    root = tmp_path / "album"
    (root / "b").mkdir(parents=True)
    (root / "a" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / ".cache").mkdir()
    shutil.copy(registered.dog, root / "b" / "dog.jpg")
    shutil.copy(registered.cat, root / "a" / "deep" / "cat.JPG")
    shutil.copy(registered.dog, root / "a" / "z.jpeg")
    shutil.copy(registered.dog, root / "top.jpg")
    shutil.copy(registered.dog, root / ".cache" / "thumb.jpg")  # hidden: skipped
    shutil.copy(registered.dog, root / ".hidden.jpg")           # hidden: skipped
    (root / "notes.txt").write_text("not a photo, and not named like one: skipped")
    return root


def test_a_folder_stands_for_every_image_below_it_sorted(registered, capsys, album):
    out, err = predicted(capsys, registered.args(str(album), "--format", "json"))
    rows = json.loads(out)["images"]
    assert [row["image"] for row in rows] == [str(album / "a" / "deep" / "cat.JPG"), str(album / "a" / "z.jpeg"),
                                              str(album / "b" / "dog.jpg"), str(album / "top.jpg")]
    assert all(row["error"] is None and len(row["predictions"]) == 3 for row in rows)
    assert err == ""


def test_photos_are_predicted_in_batches_by_one_loaded_model(registered, capsys, album, monkeypatch):
    loads, calls = [], []
    real_load = search.predict.load_classifier

    class Counting:
        def __init__(self, model):
            self.model = model

        def predict(self, paths, params=None):
            calls.append(len(paths))
            return self.model.predict(paths, params=params)

    def load(uri, store):
        loads.append(uri)
        return Counting(real_load(uri, store))

    monkeypatch.setattr(search.predict, "load_classifier", load)
    out, _ = predicted(capsys, registered.args(str(album), str(registered.cat), "--batch-size", "2"))
    assert len(loads) == 1 and calls == [2, 2, 1]
    assert out.count("  1. ") == 5


def test_a_progress_line_goes_to_a_terminal_stderr_only_for_several_batches(registered, capsys, album,
                                                                           monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    out, err = predicted(capsys, registered.args(str(album), "--batch-size", "2", "--format", "csv"))
    assert "predicting" in err and "4/4" in err
    assert "predicting" not in out and len(list(csv.DictReader(io.StringIO(out)))) == 4
    _, err = predicted(capsys, registered.args(str(album), "--format", "csv"))  # one batch of 64: no line
    assert "predicting" not in err


def test_mixed_inputs_exit_1_naming_each_failure_and_still_predict_the_good_one(registered, capsys, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    folder = tmp_path / "somefolder"
    folder.mkdir()
    (folder / "readme.txt").write_text("no photos here")
    link = tmp_path / "gone.jpg"
    link.symlink_to(tmp_path / "deleted.jpg")
    missing = tmp_path / "missing.jpg"
    out, err = predicted(capsys, registered.args(str(missing), str(notes), str(folder), str(link),
                                                 str(registered.dog)), code=1)
    failures = {line.strip() for line in err.splitlines()[1:]}
    assert failures == {f"{missing}: no such file", f"{notes}: not an image (cannot be decoded)",
                        f"{folder}: is a folder with no images (1 other file)", f"{link}: broken link"}
    assert err.splitlines()[0] == "error: 4 of 5 inputs could not be predicted:"
    assert f"{registered.dog}\n  1. " in out and "no such file" not in out.split(str(folder))[1].split("\n")[0]


def test_an_unreadable_photo_is_named_as_such(registered, capsys, monkeypatch):
    locked, real_open = str(registered.cat), Path.open

    def guarded(self, *args, **kwargs):
        if str(self) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded)  # chmod does not stop root, who runs the tests in CI
    out, err = predicted(capsys, registered.args(locked, str(registered.dog)), code=1)
    assert f"{locked}: unreadable (permission)" in err and f"{registered.dog}\n  1. " in out


def test_csv_has_one_row_per_input_with_ranked_breeds_and_an_error_column(registered, capsys, tmp_path):
    missing = tmp_path / "missing.jpg"
    out, _ = predicted(capsys, registered.args(str(registered.dog), str(missing), str(registered.cat),
                                               "--format", "csv", "--top", "4"), code=1)
    reader = csv.DictReader(io.StringIO(out))
    assert reader.fieldnames == ["image", "breed_1", "probability_1", "breed_2", "probability_2", "breed_3",
                                 "probability_3", "breed_4", "probability_4", "error"]
    rows = list(reader)
    assert [row["image"] for row in rows] == [str(registered.dog), str(missing), str(registered.cat)]
    for row in rows[0], rows[2]:
        probabilities = [float(row[f"probability_{k}"]) for k in range(1, 5)]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < probabilities[0] <= 1
        assert row["breed_1"] and row["error"] == ""
    assert rows[1]["error"] == "no such file" and rows[1]["breed_1"] == rows[1]["probability_1"] == ""


def test_json_to_an_output_file_leaves_stdout_empty(registered, capsys, tmp_path, album):
    target = tmp_path / "breeds.json"
    out, err = predicted(capsys, registered.args(str(album / "top.jpg"), str(tmp_path / "nope"),
                                                 "--format", "json", "--output", str(target)), code=1)
    assert out == "" and f"{tmp_path / 'nope'}: no such file" in err
    answer = json.loads(target.read_text())
    assert answer["model"] == f"models:/{MODEL}/latest"
    good, bad = answer["images"]
    assert good["image"] == str(album / "top.jpg") and good["error"] is None and len(good["predictions"]) == 3
    assert bad == {"image": str(tmp_path / "nope"), "predictions": [], "error": "no such file"}


def test_help_does_not_import_tensorflow():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "search.predict", "--help"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--format" in done.stdout
    imported = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "search.predict" in imported or "search" in imported  # importtime did report this process's imports
    assert not [name for name in imported if name.split(".")[0] in ("tensorflow", "keras", "mlflow")]


def test_inputs_that_all_fail_exit_1_without_loading_the_model(registered, capsys, tmp_path, monkeypatch):
    def refuse(uri, store):
        raise AssertionError("the model was loaded with nothing to predict")

    monkeypatch.setattr(search.predict, "load_classifier", refuse)
    out, err = predicted(capsys, registered.args(str(tmp_path / "missing.jpg"), str(tmp_path)), code=1)
    assert f"{tmp_path}: is a folder with no images" in err and "missing.jpg: no such file" in err


def test_no_registered_model_exits_2_without_predicting(capsys, tmp_path, registered):
    store = f"sqlite:///{tmp_path}/empty.db"
    assert main(["--tracking-uri", store, str(registered.dog)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no registered model" in captured.err and "Traceback" not in captured.err


def test_an_unknown_model_exits_2_naming_the_registered_ones(registered, capsys):
    _, err = predicted(capsys, registered.args(str(registered.cat), "--model", "models:/nope/1"), code=2)
    assert "unknown model 'nope'" in err and MODEL in err
    _, err = predicted(capsys, registered.args(str(registered.cat), "--model", f"models:/{MODEL}/9"), code=2)
    assert "has no version 9" in err


def test_a_trial_run_id_finds_its_registered_model(registered, capsys):
    version = MlflowClient(registered.uri).get_model_version(MODEL, "1")
    out, _ = predicted(capsys, registered.args(str(registered.cat), "--run", version.run_id, "--json"))
    assert json.loads(out)["model"] == f"models:/{MODEL}/1"


def test_the_model_loads_and_predicts_bytes_in_a_process_without_this_repo(registered, tmp_path):
    script = ("import sys, mlflow; m = mlflow.pyfunc.load_model(sys.argv[1]); "
              "out = m.predict([open(sys.argv[2], 'rb').read()]); "
              "assert not [n for n in sys.modules if n.split('.')[0] in ('search', 'runners')], 'repo code loaded'; "
              "print(out.loc[0, 'breed'], round(sum(g['probability'] for g in out.loc[0, 'top']), 6))")
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.uri, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script, f"models:/{MODEL}/1", str(registered.dog)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    breed, top5 = done.stdout.split()
    assert breed in {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
    assert 0 < float(top5) <= 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_breeds_for_image_bytes(registered, tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.uri, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    server = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}/1",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "server did not come up in 60 s"
                time.sleep(1)
        photo = base64.b64encode(registered.dog.read_bytes()).decode()
        answer = post(port, {"dataframe_split": {"columns": ["image"],
                                                 "data": [[photo], [str(registered.cat)], ["no-such.jpg"]]}})
        first, second, third = answer["predictions"]
        assert first["error"] is None and len(first["top"]) == 5
        assert first["top"][0]["breed"] == first["breed"]
        assert np.isclose(first["probability"], first["top"][0]["probability"])
        assert second["error"] is None
        assert third["breed"] is None and "no such file" in third["error"]
        ranked = post(port, {"inputs": {"image": [photo]}, "params": {"top": 10}})["predictions"][0]["top"]
        assert sum(g["probability"] for g in ranked) == pytest.approx(1.0, abs=1e-3)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and the uvicorn it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
