"""`python -m search.predict`: the top breeds of photos, from a registered best model (the seed studies' demo).

    python -m search.predict dog1.jpg dog2.jpg                           # newest version of the latest <study>-best
    python -m search.predict dog.jpg --model models:/scratch_cnn-stanford_dogs-best/3 --top 5
    python -m search.predict dog.jpg --run RUN_ID --json                 # the model registered from a trial run

A missing file or a file that is not an image gets a message on its own line and the other photos are
still predicted. Exit codes: 0 when at least one photo was predicted, 1 when none could be, 2 when the
model or the store is unknown (nothing predicted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from search.config import tracking_uri as resolve_tracking_uri
from search.errors import ConfigError

BEST_SUFFIX = "-best"


def newest_best_model(client) -> str:
    """models:/NAME/latest of the registered `<study>-best` model updated last."""
    found = [m for m in client.search_registered_models() if m.name.endswith(BEST_SUFFIX)]
    if not found:
        raise ConfigError(f"no registered model in {client.tracking_uri}: run a search first "
                          "(python -m search.run), or name one with --model models:/NAME/VERSION.")
    return f"models:/{max(found, key=lambda m: m.last_updated_timestamp).name}/latest"


def checked_model_uri(client, model: str) -> str:
    """models:/NAME/VERSION (or a bare NAME, meaning its latest version), checked to exist in the registry."""
    from mlflow.exceptions import MlflowException

    uri = model if model.startswith("models:/") else f"models:/{model}/latest"
    name, _, version = uri.removeprefix("models:/").partition("/")
    known = sorted(m.name for m in client.search_registered_models())
    if name not in known:
        raise ConfigError(f"unknown model '{name}' in {client.tracking_uri}. Registered models: "
                          f"{', '.join(known) or 'none'}.")
    if version and version != "latest" and not version.startswith("@"):
        try:
            client.get_model_version(name, version)
        except MlflowException:
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
            raise ConfigError(f"model '{name}' has no version {version}; versions: "
                              f"{', '.join(map(str, versions))}.") from None
    return uri


def model_of_run(client, run_id: str) -> str:
    """The registered model a trial run holds (tag search.registered_model, set at registration)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"no MLflow run with id '{run_id}' in {client.tracking_uri}. Check --run and "
                          "--tracking-uri.") from None
    uri = run.data.tags.get("search.registered_model")
    if not uri:
        raise ConfigError(f"run {run_id} holds no registered classifier (only a study's best trial has one); "
                          "use --model models:/<study>-best/VERSION.")
    return uri


def load_classifier(uri: str, store: str):
    """The pyfunc classifier behind a models:/ URI."""
    import mlflow

    from search.tracking import fluent_api

    with fluent_api(store), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's hints about type annotations are for model authors
        return mlflow.pyfunc.load_model(uri)


def predict(classifier, images: list[str], top: int) -> list[dict]:
    """Per image: its path, the top breeds with probabilities, or why it could not be read."""
    answers = {image: {"image": image, "predictions": [], "error": "no such file"}
               for image in images if not Path(image).is_file()}
    readable = [image for image in images if image not in answers]
    if readable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = classifier.predict(readable, params={"top": top}).to_dict("records")
        for image, row in zip(readable, rows):
            error = row["error"] if isinstance(row["error"], str) else None
            answers[image] = {"image": image, "predictions": list(row["top"]) if not error else [], "error": error}
    return [answers[image] for image in images]


def to_text(answers: list[dict]) -> str:
    """The answers as lines a person reads: each image, then its ranked breeds."""
    lines = []
    for answer in answers:
        if answer["error"]:
            lines.append(f"{answer['image']}: cannot predict: {answer['error']}")
            continue
        lines.append(answer["image"])
        for rank, guess in enumerate(answer["predictions"], 1):
            lines.append(f"  {rank}. {guess['breed']:<32} {guess['probability']:6.1%}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line of search.predict."""
    p = argparse.ArgumentParser(prog="python -m search.predict", description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="photo files")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="models:/NAME/VERSION, or a registered NAME for its latest version "
                                        "(default: the <study>-best model registered last)")
    source.add_argument("--run", help="a trial run id whose registered classifier to use")
    p.add_argument("--top", type=int, default=3, help="breeds shown per image (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else "
                                          "sqlite:///mlruns/mlflow.db)")
    p.add_argument("--workdir", default="mlruns")
    return p


def main(argv: list[str] | None = None) -> int:
    """Predict every image; exit 2 for an unknown model or store, 1 if no image could be predicted."""
    args = parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from search.tracking import connect

    try:
        client = connect(resolve_tracking_uri(args.tracking_uri, args.workdir))
        if args.run:
            uri = model_of_run(client, args.run)
        else:
            uri = checked_model_uri(client, args.model) if args.model else newest_best_model(client)
        classifier = load_classifier(uri, client.tracking_uri)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    answers = predict(classifier, args.images, max(1, args.top))
    print(json.dumps({"model": uri, "images": answers}, indent=2) if args.json else to_text(answers))
    return 0 if any(not a["error"] for a in answers) else 1


if __name__ == "__main__":
    sys.exit(main())
