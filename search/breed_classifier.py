"""The registered model's code: an MLflow pyfunc that takes photos (paths or bytes) and returns breeds.

This file travels inside every registered `<study>-best` model (MLflow "models from code"), together with
`runners/photos.py` (the same decode-and-resize the training data went through) as a code path, so
`mlflow.pyfunc.load_model` and `mlflow models serve` need nothing from this repository. It imports only
numpy, pandas, keras, mlflow and that photos module.

Input: a list of paths or bytes, a single one, or a DataFrame whose `image` column (else first column)
holds paths, bytes, or base64 text (what a JSON request to `mlflow models serve` carries). Output: one row
per image with the top breed, its probability, the `top` breeds as [{"breed", "probability"}] and an
`error` (None, or why that image could not be read); one bad image never stops the others.
"""
from __future__ import annotations

import base64
import binascii
import json
import os

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

DEFAULT_TOP = 5


class BreedClassifier(PythonModel):
    """A Keras classifier of photos, with its class names, input size and preprocessing."""

    def load_context(self, context):
        """Load the Keras model and the label file the model carries as artifacts."""
        import keras

        self.model = keras.models.load_model(context.artifacts["keras_model"], compile=False)
        with open(context.artifacts["labels"]) as f:
            labels = json.load(f)
        self.class_names, self.image_size = labels["class_names"], int(labels["image_size"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Top breeds with probabilities per image; unreadable images get an error and no breed.

        model_input may also be a list or one path/bytes (see as_sources); the DataFrame hint tells MLflow
        to pass inputs through unchanged."""
        top = int((params or {}).get("top", DEFAULT_TOP))
        images, errors = [], []
        for source in as_sources(model_input):
            try:
                images.append(decode(source, self.image_size))
                errors.append(None)
            except Exception as err:  # one bad image is that row's problem, never the request's
                images.append(None)
                errors.append(str(err) or type(err).__name__)
        good = [i for i, image in enumerate(images) if image is not None]
        probabilities = {}
        if good:
            batch = np.stack([images[i] for i in good]).astype(np.float32)
            for i, row in zip(good, np.asarray(self.model.predict(batch, verbose=0))):
                probabilities[i] = row
        return pd.DataFrame([self.row(probabilities.get(i), errors[i], top) for i in range(len(images))],
                            columns=["breed", "probability", "top", "error"], dtype=object)  # None stays null in JSON

    def row(self, probabilities, error, top: int) -> dict:
        """One image's answer."""
        if probabilities is None:
            return {"breed": None, "probability": None, "top": [], "error": error}
        best = np.argsort(probabilities)[::-1][:top]
        ranked = [{"breed": self.class_names[k], "probability": float(probabilities[k])} for k in best]
        return {"breed": ranked[0]["breed"], "probability": ranked[0]["probability"], "top": ranked,
                "error": None}


def as_sources(model_input) -> list:
    """The images of a request as a list of paths, bytes or base64 text."""
    if isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return model_input[column].tolist()
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, (str, bytes, bytearray, os.PathLike)):
        return [model_input]
    if isinstance(model_input, dict):
        return list(model_input.get("image", next(iter(model_input.values()), [])))
    return list(model_input)


def decode(source, size: int) -> np.ndarray:
    """(size, size, 3) uint8 pixels from a path, bytes or base64 text, decoded exactly as in training."""
    from photos import decode_photo  # runners/photos.py, shipped with the model as a code path

    if isinstance(source, str) and not os.path.exists(source):
        source = from_base64(source)
    return decode_photo(source, size)


def from_base64(text: str) -> bytes:
    """Bytes of a base64 image; a string that is neither a file nor base64 is reported as a missing file."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FileNotFoundError(f"no such file: {text}") from None


set_model(BreedClassifier())
