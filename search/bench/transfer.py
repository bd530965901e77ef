"""`python -m search.bench transfer`: what the feature cache buys, and what a head search reaches on the dogs.

Prints the embedding rate and cache build time, the time of one head-only trial with the cache and the same
trial through the backbone without it (same images, same epochs), then runs a quick head search over the
cached features and prints its best top-1 / top-3 on the test split (chosen by validation accuracy).
"""
from __future__ import annotations

import argparse
import logging
import platform
import shutil
import time
from pathlib import Path

import yaml


def parse(argv: list[str]) -> argparse.Namespace:
    """The benchmark's options."""
    p = argparse.ArgumentParser(prog="python -m search.bench transfer", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", help="weights file, as search.run's --weights")
    p.add_argument("--data-dir", help="folder holding Images/ (default: Keras's cache)")
    p.add_argument("--breeds", help="N (first N breeds) or names; default all 120")
    p.add_argument("--subset", type=int, help="at most this many images per split")
    p.add_argument("--image-size", type=int, default=288, help="input side (default 288, the transfer space's)")
    p.add_argument("--epochs", type=int, default=20, help="most epochs of a head trial")
    p.add_argument("--compare-epochs", type=int, default=1, help="epochs of the with/without-cache comparison")
    p.add_argument("--trials", type=int, default=40, help="trials of the head search (0 = skip it)")
    p.add_argument("--workdir", default="mlruns/bench-transfer")
    p.add_argument("--rebuild", action="store_true", help="delete this data's feature cache first")
    return p.parse_args(argv)


def head_only_space(folder: Path) -> Path:
    """The shipped transfer space with the backbone frozen and no augmentation, so every trial uses the cache."""
    from search import space as spaces

    raw = yaml.safe_load(spaces.find_space_file("transfer").read_text())
    params = raw["params"]
    params["mode"], params["augmentation"] = "frozen", "none"
    for name in [n for n, spec in params.items() if isinstance(spec, dict) and "mode" in (spec.get("when") or {})]:
        del params[name]
    raw["name"] = "transfer_head"
    path = folder / "transfer_head.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main(argv: list[str]) -> int:
    """Measure and print the table."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parse(argv)
    from runners import transfer
    from runners.datasets import load_dataset
    from runners.device import cpu_count
    from search import space as spaces
    from search.config import SearchConfig
    from search.drivers import run_search
    from search.setup import parse_breeds

    workdir = Path(args.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load_dataset("stanford_dogs", data_dir=args.data_dir, image_size=args.image_size, subset=args.subset,
                        breeds=parse_breeds(args.breeds), workdir=workdir)
    load_seconds = time.perf_counter() - started
    backbone = transfer.backbone_named(args.backbone)
    weights = transfer.resolve_weights(backbone, args.image_size, args.weights)
    if args.rebuild:
        key = transfer.features.cache_key(backbone.name, weights.sha256, args.image_size, data)
        shutil.rmtree(workdir / "cache" / "features" / key, ignore_errors=True)
    cache, _ = transfer.feature_set(data, backbone, weights, workdir)
    space = spaces.load_space("transfer")
    params = {**spaces.default_params(space), "backbone": backbone.name}
    options = {"workdir": str(workdir), "weights": args.weights}
    with_cache, cached_result = timed(lambda: transfer.train_and_evaluate(
        params, data, epochs=args.compare_epochs, patience=99, seed=0, recipes=space.recipes, options=options))
    # the same head through the frozen backbone, image batches every epoch: what a trial costs without the cache
    without_cache, plain_result = timed(lambda: transfer.train_and_evaluate(
        params, data, epochs=args.compare_epochs, patience=99, seed=0, recipes=space.recipes,
        options={**options, "feature_cache": False}))
    sizes = data.sizes()
    rows = [("machine", f"{cpu_name()}, {cpu_count()} cores, AVX-512 {'yes' if has_avx512() else 'no'}"),
            ("data", f"{len(data.class_names)} breeds, {args.image_size}px, train {sizes['train']:,} / "
                     f"val {sizes['val']:,} / test {sizes['test']:,} (loaded in {load_seconds:.1f} s)"),
            ("backbone", f"{backbone.name}, weights {weights.tags()['search.weights_file']} "
                         f"(sha256 {weights.sha256[:12]})"),
            ("embedding rate", f"{cache.images_per_second:.1f} images/s"),
            ("cache build", f"{cache.build_seconds:.1f} s ({'built now' if cache.built else 'built earlier'})"),
            (f"head trial, {args.compare_epochs} epoch(s), with cache", f"{with_cache:.1f} s "
                                                                     f"(test top-1 {cached_result.test['test_accuracy']:.3f})"),
            (f"head trial, {args.compare_epochs} epoch(s), without cache", f"{without_cache:.1f} s "
                                                                        f"(test top-1 {plain_result.test['test_accuracy']:.3f})"),
            ("speed-up", f"{without_cache / with_cache:.1f}x")]
    if args.trials:
        search_started = time.perf_counter()
        summary = run_search(SearchConfig(space=str(head_only_space(workdir)), dataset="stanford_dogs",
                                          data_dir=args.data_dir, breeds=args.breeds, subset=args.subset or 0,
                                          image_size=args.image_size, backbone=backbone.name, weights=args.weights,
                                          trials=args.trials, epochs=args.epochs, workdir=str(workdir),
                                          study_name=f"bench-transfer-{backbone.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        best = [t for t in load_trials(summary) if t.number == summary.best_trial][0]
        rows += [(f"head search, {args.trials} trials x <= {args.epochs} epochs", f"{time.perf_counter() - search_started:.1f} s"),
                 ("best trial (by val)", f"#{best.number}: val {best.value:.3f}, test top-1 "
                                         f"{best.user_attrs['test_accuracy']:.3f}, top-3 {best.user_attrs['test_top3_accuracy']:.3f}"),
                 ("total, embedding included", f"{time.perf_counter() - started:.1f} s")]
    width = max(len(name) for name, _ in rows)
    print(f"\n{'measure'.ljust(width)} | value\n{'-' * width}-+-{'-' * 40}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    return 0


def timed(work):
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def load_trials(summary):
    """The finished study's trials."""
    from search.stores import find_study

    return find_study(summary.study_name, summary.storage).trials


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def has_avx512() -> bool:
    """True when the CPU reports AVX-512 (foundation)."""
    return " avx512f" in Path("/proc/cpuinfo").read_text()
