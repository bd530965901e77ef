"""Register a study's best model as `<study>-best`: a pyfunc that serves breeds without this repository.

The registered model is `search/breed_classifier.py` logged as MLflow "models from code", carrying as
artifacts the trial's `.keras` file and `labels.json` (class names, input size), and as a code path
`runners/photos.py`, the decode-and-resize the training images went through. Each time the best trial
changes a new version appears, tagged with the trial number and its validation accuracy; asking again for
the same trial returns the version that already holds it.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from search.tracking import fluent_api, temp_artifact_dir

MODEL_CODE = Path(__file__).with_name("breed_classifier.py")
MODEL_NAME = "breed_classifier"  # the model's name inside its run
REQUIREMENTS = ("mlflow", "keras", "tensorflow", "numpy", "pandas", "pillow", "scipy", "tqdm")


def registered_name(study: str) -> str:
    """The registry name of a study's best model."""
    return f"{study}-best"


def versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of the registered model `name`; none when it is not registered yet."""
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        return []
    return client.search_model_versions(f"name = '{name}'")


def version_of_trial(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version of `name` already registered from this trial's run, if any."""
    return next((v for v in versions(client, name) if v.tags.get("search.run_id") == run_id), None)


def requirements() -> list[str]:
    """Pinned pip requirements of the serving environment (given, so MLflow does not load the model to guess)."""
    found = []
    for package in REQUIREMENTS:
        try:
            found.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(package)
    return found


def preprocessing_code() -> Path:
    """runners/photos.py wherever the package is installed: the decoding the training images went through."""
    from runners import photos

    return Path(photos.__file__)


def log_classifier(client: MlflowClient, run_id: str, keras_path: Path, class_names: list[str],
                   image_size: int, registered: str | None = None):
    """Log the pyfunc classifier to a run (and register it under `registered`); returns MLflow's ModelInfo."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    signature = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("top", "long", 5)]))
    with temp_artifact_dir() as scratch:
        labels = Path(scratch) / "labels.json"
        labels.write_text(json.dumps({"class_names": list(class_names), "image_size": int(image_size)}))
        # MLflow prints "Successfully registered model ..." and "Created version ..." itself; the search logs
        # one line naming the version instead
        with fluent_api(client.tracking_uri), mlflow.start_run(run_id=run_id, nested=True), \
                warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # MLflow's advice on type hints and input examples, for every model
            return mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(MODEL_CODE), code_paths=[str(preprocessing_code())],
                artifacts={"keras_model": str(keras_path), "labels": str(labels)}, signature=signature,
                pip_requirements=requirements(), registered_model_name=registered)


def register_best(client: MlflowClient, study: str, run_id: str, keras_path: Path, class_names: list[str],
                  image_size: int, trial_number: int | str, val_accuracy: float) -> ModelVersion:
    """Register a trial's model as `<study>-best` unless that trial is already a version; returns the version.

    `trial_number` may be a text naming what else the model is (an ensemble: 'ensemble 3 (50%), 7 (50%)')."""
    name = registered_name(study)
    existing = version_of_trial(client, name, run_id)
    if existing is not None:
        return existing
    info = log_classifier(client, run_id, keras_path, class_names, image_size, registered=name)
    version = str(info.registered_model_version)
    tags = {"search.study": study, "search.trial": str(trial_number), "search.run_id": run_id,
            "search.val_accuracy": f"{val_accuracy:.6f}", "search.image_size": str(image_size),
            "search.classes": str(len(class_names))}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=(
        f"{'Best trial ' if isinstance(trial_number, int) else 'The '}{trial_number} of study {study}: "
        f"validation accuracy {val_accuracy:.4f}, "
        f"{len(class_names)} classes at {image_size}px. Input: image paths, bytes or base64 text."))
    client.set_tag(run_id, "search.registered_model", f"models:/{name}/{version}")
    return client.get_model_version(name, version)


def register_trial(client: MlflowClient, study: str, run_id: str, keras_path: Path, class_names: list[str],
                   trial_number: int, val_accuracy: float) -> ModelVersion:
    """register_best with the input size read from the trial's run (its image_size parameter)."""
    params = client.get_run(run_id).data.params
    if "image_size" in params:
        image_size = int(params["image_size"])
    else:  # a space without the parameter: the model's own input says it
        import keras

        image_size = int(keras.models.load_model(keras_path, compile=False).input_shape[1])
    return register_best(client, study, run_id, keras_path, class_names, image_size, trial_number, val_accuracy)
