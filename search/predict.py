"""`python -m search.predict`: the top breeds of photos, from a registered best model (the seed studies' demo).

    python -m search.predict dog1.jpg dog2.jpg                           # newest version of the latest <study>-best
    python -m search.predict photos/ --format csv --output breeds.csv   # every image below a folder, as CSV
    python -m search.predict dog.jpg --model models:/scratch_cnn-stanford_dogs-best/3 --top 5
    python -m search.predict dog.jpg --run RUN_ID --format json          # the model registered from a trial run

Inputs are photo files or folders; a folder stands for every image file below it (recursively, sorted by
path; hidden files and folders are skipped). The model is loaded once and photos are predicted in batches
(--batch-size), with a progress line on stderr when stderr is a terminal and there is more than one batch.

The result (stdout, or --output FILE) has one row per photo: its path, its top breeds with probabilities,
and an error for a photo that could not be predicted. --format text (the default) is for reading, csv and
json are for programs. An input that fails never stops the others: every good photo is predicted, then
each failure is named on stderr with its kind ("no such file", "broken link", "is a folder with no images",
"not an image (cannot be decoded)", "unreadable (permission)", ...).

Exit codes: 0 when every input was predicted, 1 when any input failed (the others are still predicted and
written), 2 for bad usage: an unknown model or store, no registered model, an --output that cannot be
written (nothing predicted).
"""
from __future__ import annotations

import argparse
import csv
import errno
import io
import json
import os
import stat
import sys
import warnings
from pathlib import Path

from search.errors import ConfigError

BEST_SUFFIX = "-best"
FORMATS = ("text", "csv", "json")
DEFAULT_BATCH = 64
# File names a folder's walk treats as photos (what Pillow decodes); others below a folder are skipped.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                            ".ppm", ".pgm", ".pnm"})
JUNK_FOLDERS = frozenset({"__MACOSX"})  # what a zip made on macOS leaves behind


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


# ---------------------------------------------------------------------------------------------- inputs

def os_reason(err: OSError) -> str:
    """The kind of an OS error on a path, in the words the command reports."""
    if isinstance(err, PermissionError):
        return "unreadable (permission)"
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, NotADirectoryError):
        return "no such file (a folder on its path is a file)"
    if err.errno == errno.ELOOP:
        return "broken link (a loop of links)"
    return f"unreadable ({err.strerror or err})"


def file_problem(path: str) -> str | None:
    """Why a path that is not a folder cannot be read as a photo, or None when it can be opened."""
    try:
        info = os.lstat(path)
    except OSError as err:
        return os_reason(err)
    if stat.S_ISLNK(info.st_mode):
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return "broken link"
        except OSError as err:
            return "broken link (a loop of links)" if err.errno == errno.ELOOP else os_reason(err)
    if stat.S_ISDIR(info.st_mode):
        return None  # a folder is expanded, never read as a photo
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a device, pipe or socket)"
    try:
        with Path(path).open("rb"):
            pass
    except OSError as err:
        return os_reason(err)
    return None


def is_photo_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def folder_photos(folder: str) -> tuple[list[str], list[tuple[str, str]], int]:
    """Every photo file below a folder, sorted by path; [(subfolder, why)] of folders that could not be read;
    how many other (non-photo) files were skipped. Links to folders are followed once (no loops)."""
    photos, problems, others = [], [], 0
    seen = set()

    def unreadable(err: OSError) -> None:
        problems.append((err.filename or folder, os_reason(err)))

    for here, folders, files in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [f for f in folders if not f.startswith(".") and f not in JUNK_FOLDERS]
        for name in files:
            if is_photo_name(name):
                photos.append(os.path.join(here, name))
            else:
                others += not name.startswith(".")
    photos.sort(key=lambda p: Path(p).parts)
    return photos, problems, others


def expand(inputs: list[str]) -> list[dict]:
    """One entry per photo to predict or input that failed: {"image": path, "error": None or why}, in order."""
    entries = []
    for given in inputs:
        problem = file_problem(given)
        if problem or not os.path.isdir(given):
            entries.append({"image": given, "error": problem})
            continue
        photos, problems, others = folder_photos(given)
        top_problem = next((why for where, why in problems if os.path.normpath(where) == os.path.normpath(given)),
                           None)
        if top_problem:
            entries.append({"image": given, "error": top_problem})
            continue
        entries += [{"image": where, "error": why} for where, why in problems]
        if not photos and not problems:
            more = f" ({others} other file{'s' * (others != 1)})" if others else ""
            entries.append({"image": given, "error": f"is a folder with no images{more}"})
        for photo in photos:
            entries.append({"image": photo, "error": file_problem(photo)})
    return entries


# ------------------------------------------------------------------------------------------- predicting

def model_reason(error) -> str | None:
    """The classifier's reason for one image, in the words the command reports (None: no error)."""
    if not isinstance(error, str):
        return None
    if error.startswith("not an image"):
        return "not an image (cannot be decoded)"
    if error.startswith("unreadable (") and "permission" in error.lower():
        return "unreadable (permission)"
    if error.startswith("no such file"):
        return "no such file"
    if error == "empty file":
        return "empty file (cannot be decoded)"
    if error == "truncated":
        return "truncated image (cannot be decoded)"
    return error


def progress_bar(total: int, batch_size: int):
    """A tqdm progress line on stderr (count, rate, time left), off unless stderr is a terminal and the
    input takes two batches or more."""
    from tqdm import tqdm

    stream = sys.stderr
    shown = total >= 2 * batch_size and hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, unit="photo", desc="predicting", file=stream, disable=not shown, dynamic_ncols=True,
                smoothing=0.1)


def predict(classifier, images: list[str], top: int, batch_size: int = DEFAULT_BATCH) -> list[dict]:
    """Per input (a folder: per photo below it): its path, the top breeds with probabilities, or why it
    could not be predicted. One classifier call per batch of batch_size photos."""
    return predict_entries(classifier, expand(images), top, batch_size)


def predict_entries(classifier, entries: list[dict], top: int, batch_size: int = DEFAULT_BATCH) -> list[dict]:
    """predict() of inputs already expanded; the classifier is only called for entries without an error."""
    answers = [{"image": e["image"], "predictions": [], "error": e["error"]} for e in entries]
    todo = [i for i, answer in enumerate(answers) if not answer["error"]]
    batch_size = max(1, batch_size)
    with progress_bar(len(todo), batch_size) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            paths = [answers[i]["image"] for i in batch]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rows = classifier.predict(paths, params={"top": top}).to_dict("records")
                if len(rows) != len(paths):
                    raise RuntimeError(f"the model answered {len(rows)} rows for {len(paths)} photos")
            except Exception as err:  # a failed batch is those photos' problem, never the other batches'
                rows = [{"top": [], "error": f"prediction failed ({type(err).__name__}: {err})"}] * len(paths)
            for i, row in zip(batch, rows):
                error = model_reason(row.get("error"))
                answers[i]["error"] = error
                answers[i]["predictions"] = [] if error else [
                    {"breed": g["breed"], "probability": float(g["probability"])} for g in row["top"]]
            bar.update(len(batch))
    return answers


# ---------------------------------------------------------------------------------------------- output

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
    return "\n".join(lines) + ("\n" if lines else "")


def to_csv(answers: list[dict], top: int) -> str:
    """One row per image: image, breed_1, probability_1, ..., breed_<top>, probability_<top>, error."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", *[f"{kind}_{rank}" for rank in range(1, top + 1) for kind in ("breed", "probability")],
                     "error"])
    for answer in answers:
        guesses = answer["predictions"][:top]
        cells = [v for g in guesses for v in (g["breed"], f"{g['probability']:.6f}")]
        writer.writerow([answer["image"], *cells, *[""] * (2 * top - len(cells)), answer["error"] or ""])
    return out.getvalue()


def to_json(answers: list[dict], uri: str) -> str:
    """{"model": uri, "images": [{"image", "predictions": [{"breed", "probability"}], "error"}]}."""
    return json.dumps({"model": uri, "images": answers}, indent=2) + "\n"


def failure_report(answers: list[dict]) -> str:
    """The lines on stderr that name every input that failed and why."""
    failed = [a for a in answers if a["error"]]
    lines = [f"error: {len(failed)} of {len(answers)} input{'s' * (len(answers) != 1)} could not be predicted:"]
    lines += [f"  {a['image']}: {a['error']}" for a in failed]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line of search.predict."""
    p = argparse.ArgumentParser(prog="python -m search.predict", description=__doc__.split("\n")[0],
                                epilog="Exit codes: 0 every input predicted, 1 some input failed (the rest are "
                                       "still predicted), 2 bad usage or an unknown model (nothing predicted).")
    p.add_argument("images", nargs="+", metavar="PATH",
                   help="photo files, or folders (every image file below them, sorted)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="models:/NAME/VERSION, or a registered NAME for its latest version "
                                        "(default: the <study>-best model registered last)")
    source.add_argument("--run", help="a trial run id whose registered classifier to use")
    p.add_argument("--top", type=int, default=3, help="breeds shown per image (default 3)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="text (default: for reading), csv or json (one row per photo, with an error column)")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p.add_argument("--output", "-o", metavar="FILE", help="write the result to FILE instead of stdout")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                   help=f"photos per model call (default {DEFAULT_BATCH})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else "
                                          "sqlite:///mlruns/mlflow.db)")
    p.add_argument("--workdir", default="mlruns")
    return p


def output_problem(output: str | None) -> str | None:
    """Why --output cannot be written (checked before any work), or None."""
    if output is None or output == "-":
        return None
    target = Path(output)
    if target.is_dir():
        return f"--output {output} is a folder; name a file."
    if not target.parent.is_dir():
        return f"--output {output}: the folder {target.parent} does not exist."
    return None


def main(argv: list[str] | None = None) -> int:
    """Predict every input; exit 2 for bad usage or an unknown model or store, 1 if any input failed."""
    p = parser()
    args = p.parse_args(argv)
    fmt = args.format or ("json" if args.json else "text")
    if args.json and args.format not in (None, "json"):
        p.error(f"--json contradicts --format {args.format}")
    if args.batch_size < 1:
        p.error("--batch-size must be 1 or more")
    top = max(1, args.top)
    if problem := output_problem(args.output):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # imported here, not at the top: --help and usage errors stay fast and never load TensorFlow
    from search.stores import tracking_uri as resolve_tracking_uri
    from search.tracking import connect

    try:
        client = connect(resolve_tracking_uri(args.tracking_uri, args.workdir))
        if args.run:
            uri = model_of_run(client, args.run)
        else:
            uri = checked_model_uri(client, args.model) if args.model else newest_best_model(client)
        entries = expand(args.images)
        # loaded once, and only when some input can be predicted (loading takes seconds)
        classifier = load_classifier(uri, client.tracking_uri) if any(not e["error"] for e in entries) else None
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        answers = predict_entries(classifier, entries, top, args.batch_size)
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    result = {"text": lambda: to_text(answers), "csv": lambda: to_csv(answers, top),
              "json": lambda: to_json(answers, uri)}[fmt]()
    if args.output and args.output != "-":
        try:
            Path(args.output).write_text(result, encoding="utf-8", newline="")
        except OSError as err:
            print(f"error: cannot write --output {args.output}: {err.strerror or err}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(result)
        sys.stdout.flush()
    if any(a["error"] for a in answers):
        print(failure_report(answers), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
