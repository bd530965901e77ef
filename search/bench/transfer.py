"""`python -m search.bench transfer`: each backbone alone, the backbones together, and their ensemble, on the dogs.

For every backbone of --backbones (default EfficientNet-Lite0, Lite1 and Lite2) it builds the feature cache
(photos and mirror images) and trains the transfer space's default head on it; then one head on all of them
side by side, then the ensemble that greedy selection on validation makes of those heads. One table: test
top-1 and top-3 (chosen by nothing: every row is one fixed recipe), validation top-1, the embedding rate beside
the machine's matmul rate, and the seconds each row took. Optionally (--compare-epochs N) the time of a head
trial with the cache against the same trial through the backbone, and (--trials N) a head search on the first
backbone's cached features.
"""
from __future__ import annotations

import argparse
import logging
import platform
import shutil
import time
from pathlib import Path

import pandas as pd
import yaml


def parse(argv: list[str]) -> argparse.Namespace:
    """The benchmark's options."""
    p = argparse.ArgumentParser(prog="python -m search.bench transfer", description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2",
                   help="backbones compared alone, together and as an ensemble (NAME,NAME,...)")
    p.add_argument("--weights", help="weights file, as search.run's --weights")
    p.add_argument("--data-dir", help="folder holding Images/ (default: Keras's cache)")
    p.add_argument("--breeds", help="N (first N breeds) or names; default all 120")
    p.add_argument("--subset", type=int, help="at most this many images per split")
    p.add_argument("--image-size", type=int, default=288, help="input side (default 288, the transfer space's)")
    p.add_argument("--epochs", type=int, default=20, help="most epochs of a head trial")
    p.add_argument("--compare-epochs", type=int, default=0,
                   help="epochs of the with/without-cache comparison on the first backbone (0 = skip it)")
    p.add_argument("--trials", type=int, default=0, help="trials of a head search on the first backbone (0 = skip it)")
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
    from runners.speed import matmul_gflops

    workdir = Path(args.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load_dataset("stanford_dogs", data_dir=args.data_dir, image_size=args.image_size, subset=args.subset,
                        breeds=parse_breeds(args.breeds), workdir=workdir)
    load_seconds = time.perf_counter() - started
    backbones = [transfer.backbone_named(name).name for name in args.backbones.split(",") if name.strip()]
    if args.rebuild:
        for name in backbones:
            weights = transfer.resolve_weights(transfer.BACKBONES[name], args.image_size, args.weights)
            key = transfer.features.cache_key(name, weights.sha256, args.image_size, data)
            shutil.rmtree(workdir / "cache" / "features" / key, ignore_errors=True)
    space = spaces.load_space("transfer")
    options = {"workdir": str(workdir), "weights": args.weights}
    epochs = space.budget["epochs"]
    sizes = data.sizes()
    print(f"machine: {cpu_name()}, {cpu_count()} cores, AVX-512 {'yes' if has_avx512() else 'no'}, "
          f"AVX512_BF16 {'yes' if has_bf16() else 'no'}; {matmul_gflops():.0f} GFLOP/s float32 matmul")
    print(f"data: {len(data.class_names)} breeds, {args.image_size}px, train {sizes['train']:,} / val {sizes['val']:,} / "
          f"test {sizes['test']:,} (loaded in {load_seconds:.1f} s)")
    results, table = {}, []
    for choice in [*backbones, "+".join(backbones)] if len(backbones) > 1 else backbones:
        params = {**spaces.default_params(space), "backbone": choice}
        seconds, result = timed(lambda: transfer.train_and_evaluate(params, data, epochs=epochs, patience=3, seed=0,
                                                                    recipes=space.recipes, options=options))
        results[choice] = result
        rates = [transfer.features.cached_rate(workdir, key) for key in result.tags["search.feature_cache_key"].split(",")]
        table.append({"model": choice.replace("efficientnet_", ""), "test top-1": result.test["test_accuracy"],
                      "test top-3": result.test["test_top3_accuracy"], "val top-1": result.val_accuracy,
                      "embedding images/s": 1 / sum(1 / r for r in rates),
                      "caches": result.tags["search.feature_cache"], "mirror TTA": result.tags["search.mirror_tta"],
                      "seconds": seconds})
    if len(results) > 1:
        table.append(ensemble_row(results, data))
    print(f"\neach backbone alone, together, and their ensemble (the transfer space's default head, {epochs} epochs; "
          f"total {time.perf_counter() - started:.0f} s, embedding included)")
    print(pd.DataFrame(table).to_markdown(index=False, floatfmt=".4f"))
    rows = []
    backbone = transfer.BACKBONES[backbones[0]]
    params = {**spaces.default_params(space), "backbone": backbone.name, "augmentation": "none"}
    if args.compare_epochs:
        with_cache, cached_result = timed(lambda: transfer.train_and_evaluate(
            params, data, epochs=args.compare_epochs, patience=99, seed=0, recipes=space.recipes, options=options))
        # the same head through the frozen backbone, image batches every epoch: what a trial costs without the cache
        without_cache, plain_result = timed(lambda: transfer.train_and_evaluate(
            params, data, epochs=args.compare_epochs, patience=99, seed=0, recipes=space.recipes,
            options={**options, "feature_cache": False}))
        rows += [(f"head trial, {args.compare_epochs} epoch(s), with cache", f"{with_cache:.1f} s "
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
                                         f"{best.user_attrs['test_accuracy']:.3f}, top-3 {best.user_attrs['test_top3_accuracy']:.3f}")]
    if not rows:
        return 0
    width = max(len(name) for name, _ in rows)
    print(f"\n{'measure'.ljust(width)} | value\n{'-' * width}-+-{'-' * 40}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    return 0


def ensemble_row(results: dict, data) -> dict:
    """Greedy ensemble selection (search/ensemble.py) over the rows' heads, on validation; scored on test."""
    from search.ensemble import combine

    found = combine({n: r.val_probabilities for n, r in results.items()},
                    {n: r.test_probabilities for n, r in results.items()}, data.splits["val"][1], data.splits["test"][1])
    members = " + ".join(f"{n.replace('efficientnet_', '')} x{c}" for n, c in found.counts.items())
    return {"model": f"ensemble: {members}", "test top-1": found.test_accuracy, "test top-3": found.test_top3_accuracy,
            "val top-1": found.val_accuracy, "embedding images/s": None, "caches": "", "mirror TTA": "as each member",
            "seconds": 0.0}


def has_bf16() -> bool:
    """True when the CPU reports AVX512_BF16."""
    return "avx512_bf16" in Path("/proc/cpuinfo").read_text()


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
