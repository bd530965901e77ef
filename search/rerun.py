"""`python -m search.run --rerun STUDY:TRIAL`: retrain one leaderboard row exactly, as a new MLflow run.

Everything comes from the stores: the parameters and seed from the Optuna trial, the dataset, subset,
epochs and patience from its MLflow run, and the space file (for the augmentation recipes), data folder
and breed selection from the run of the invocation that ran it. Hash-decided splits make the data the same.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from search import space as spaces
from search import tracking
from search.stores import tracking_uri as resolve_tracking_uri
from search.errors import ConfigError

log = logging.getLogger("search")


def parse_spec(spec: str) -> tuple[str, int]:
    """'scratch_cnn-cifar10:17' -> ('scratch_cnn-cifar10', 17)."""
    name, _, number = spec.rpartition(":")
    if not name or not number.isdigit():
        raise ConfigError(f"--rerun takes STUDY:TRIAL, for example scratch_cnn-cifar10:17; got '{spec}'")
    return name, int(number)


def rerun(spec: str, storage: str | None = None, tracking_uri: str | None = None,
          workdir: str = "mlruns") -> dict:
    """Retrain the trial; returns the original's and the re-run's validation accuracy and the new run id."""
    from runners.datasets import load_dataset
    from runners.protocol import runner_named
    from runners.callbacks import EachEpoch
    from search.setup import parse_breeds
    from search.stores import find_study
    from search.trial import EpochLog

    name, number = parse_spec(spec)
    study = find_study(name, storage, workdir)
    if number >= len(study.trials):
        raise ConfigError(f"study {name} has trials 0..{len(study.trials) - 1}; there is no trial {number}")
    trial = study.trials[number]
    client = tracking.connect(resolve_tracking_uri(tracking_uri, workdir))
    original = client.get_run(trial.user_attrs["mlflow_run_id"])
    invocation = client.get_run(original.data.tags["mlflow.parentRunId"])
    context, settings = original.data.params, invocation.data.params
    from runners.device import configure_devices

    # the precision the original trained in (bfloat16 and float32 round differently); float32 before it was logged
    configure_devices(invocation.data.tags.get("search.mixed_precision", "False") != "False")
    with tempfile.TemporaryDirectory() as folder:
        space_file = client.download_artifacts(invocation.info.run_id, "space.yaml", folder)
        space = spaces.load_space(space_file, context["dataset"])
    params = {**spaces.fixed_params(space), **trial.params}
    params = {p.name: params[p.name] for p in space.params.values() if p.name in params and p.active(params)}
    subset = None if context["subset"] == "None" else int(context["subset"])
    data = load_dataset(context["dataset"], data_dir=none_if(settings.get("data_dir")),
                        image_size=int(params["image_size"]), subset=subset,
                        breeds=parse_breeds(none_if(settings.get("breeds"))), workdir=workdir)
    run_id = client.create_run(original.info.experiment_id, run_name=f"rerun of trial-{number}", tags={
        tracking.ROLE: "rerun", "optuna.study": name, "search.rerun_of": f"{name}:{number}",
        "search.rerun_of_run": original.info.run_id}).info.run_id
    client.log_batch(run_id, params=[tracking.Param(k, str(v)) for k, v in {**params, **context}.items()])
    result = runner_named(space.model).train_and_evaluate(
        params, data, epochs=int(context["epochs_max"]), patience=int(context["patience"]),
        seed=int(context["seed"]), recipes=space.recipes, callbacks=[EachEpoch(EpochLog(client, run_id))],
        options={"workdir": str(Path(workdir)), "data_dir": none_if(settings.get("data_dir")),
                 "architectures": space.architectures})
    tracking.log_metrics(client, run_id, {"best_val_accuracy": result.val_accuracy, **result.test})
    client.set_terminated(run_id, "FINISHED")
    was = original.data.metrics.get("best_val_accuracy")
    log.info(f"re-ran {name}:{number}: val_accuracy {result.val_accuracy:.4f} (original "
             f"{'-' if was is None else f'{was:.4f}'}); MLflow run {run_id}")
    return {"original_val_accuracy": was, "val_accuracy": result.val_accuracy, "run_id": run_id}


def none_if(text: str | None) -> str | None:
    """MLflow keeps None as the string 'None'."""
    return None if text in (None, "None", "") else text
