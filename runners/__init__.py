"""What executes a trial: the data (datasets, splits, input pipeline, augmentation), the model, training."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of progress output
