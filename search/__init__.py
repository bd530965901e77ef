"""Hyperparameter search for image classifiers: Optuna suggests, runners/ train with Keras, MLflow records.

The path of data, one module each: `space` reads a space file, `study` drives Optuna, `runners/` build
data and models and train, `tracking` logs to MLflow, `results` reads the stores back into tables.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow: keep its chatter out
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks the network at import otherwise

__version__ = "0.1.0"
