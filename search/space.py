"""Search spaces: read a `spaces/*.yaml` file once, check it, and turn it into suggestions.

A space file is data a user can copy and edit (README, "Space files"). It is checked here, at the edge,
so every later step can trust it: an unknown key, a bad type, an empty choice list or low > high is a
`SpaceError` naming the file, the key and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from search.errors import ConfigError
from search.fidelity import RESOURCES

TOP_KEYS = {"name", "description", "model", "dataset", "budget", "params", "datasets", "recipes", "fidelity",
            "architectures", "baselines", "start", "environment"}
STARTS = ("default", "near_default")  # TPE's start-up trials after the default: its own random draws, or perturbations
BUDGET_KEYS = {"trials": int, "epochs": int, "patience": int, "subset": (int, type(None)),
               "timeout": (int, float, type(None)), "max_mflops": (int, float, str, type(None)),
               "refit": (int, float), "keep_models": int, "max_memory_growth": (int, float)}
PARAM_KEYS = {"type", "low", "high", "step", "log", "choices", "default", "when", "value", "grid"}
PARAM_TYPES = ("int", "float", "categorical", "fixed")
DATASET_KINDS = ("cifar10", "stanford_dogs", "folder")
# A named architecture: conv blocks in order, then the head. "param" defers to the trial's parameter of that name.
ARCHITECTURE_KEYS = {"blocks", "head", "dense", "dropout", "batch_norm", "residual"}
BLOCK_KEYS = {"filters", "kernel", "strides", "convs", "pool"}
BLOCK_POOLS = ("max", "average", "none", "param")
HEADS = ("flatten", "global_average", "param")
BASELINE_KEYS = {"name", "params", "grid"}


class SpaceError(ConfigError):
    """A space file that cannot be used, with the file and key that are wrong."""


@dataclass(frozen=True)
class Param:
    """One dimension of a space: a range, a choice list or a fixed value, maybe conditional on others."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()
    value: Any = None
    default: Any = None
    when: dict[str, tuple] = field(default_factory=dict)
    grid: tuple = ()

    def active(self, params: dict) -> bool:
        """True when every parent this parameter depends on took one of the allowed values."""
        return all(params.get(parent) in allowed for parent, allowed in self.when.items())


@dataclass
class Space:
    """A checked space: its budget, parameters in file order, augmentation recipes and the file it came from."""

    name: str
    model: str
    dataset: str
    budget: dict
    params: dict[str, Param]
    recipes: dict[str, list]
    source: str
    text: str
    raw: dict = field(repr=False, default_factory=dict)
    fidelity: dict = field(default_factory=dict)
    architectures: dict[str, dict] = field(default_factory=dict)   # name -> blocks and head (see check_architecture)
    baselines: list[dict] = field(default_factory=list)            # this dataset's hand-made configurations
    start: str = "default"  # near_default: TPE's start-up trials are perturbations of the default (search/sampling.py)
    environment: dict[str, str] = field(default_factory=dict)  # variables TensorFlow reads when it starts


# ---------------------------------------------------------------- finding and reading


def shipped_spaces() -> dict[str, Path]:
    """The spaces that come with the package, by name (found wherever the package is installed)."""
    folder = resources.files("spaces")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def find_space_file(name_or_path: str) -> Path:
    """A shipped space by name, or a path to a YAML file; an unknown name lists the available ones."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise SpaceError(f"space file {candidate} does not exist")
        return candidate
    shipped = shipped_spaces()
    if name_or_path in shipped:
        return shipped[name_or_path]
    close = difflib.get_close_matches(name_or_path, shipped, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise SpaceError(f"unknown space '{name_or_path}'.{hint} Available: {', '.join(sorted(shipped))}, "
                     "or a path to a .yaml file.")


def load_space(name_or_path: str, dataset: str | None = None) -> Space:
    """Read, check and resolve a space for one dataset kind (the space's default dataset if None)."""
    path = find_space_file(name_or_path)
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: a space file is a mapping with keys {sorted(TOP_KEYS)}")
    check_space(raw, path)
    kind = dataset_kind(dataset or raw.get("dataset", "cifar10"))
    resolved = resolve_dataset(raw, kind)
    space = Space(
        name=str(raw.get("name", path.stem)),
        model=str(raw.get("model", "scratch_cnn")),
        dataset=raw.get("dataset", "cifar10"),
        budget=resolved["budget"],
        params={name: make_param(name, spec) for name, spec in resolved["params"].items()},
        recipes=raw.get("recipes") or {"none": []},
        source=str(path),
        text=text,
        raw=raw,
        fidelity=dict(raw.get("fidelity") or {}),
        architectures=dict(raw.get("architectures") or {}),
        baselines=list((raw.get("baselines") or {}).get(kind) or []),
        start=str(raw.get("start", "default")),
        environment={str(k): str(v) for k, v in (raw.get("environment") or {}).items()},
    )
    check_baselines(space)
    return space


def dataset_kind(dataset: str) -> str:
    """`cifar10`, `stanford_dogs` or `folder` (for `folder:PATH`); anything else lists what exists."""
    kind = dataset.split(":", 1)[0]
    if kind not in DATASET_KINDS:
        raise ConfigError(f"unknown dataset '{dataset}'. Available: cifar10, stanford_dogs, folder:PATH "
                          "(a folder with one sub-folder of photos per class).")
    return kind


def resolve_dataset(raw: dict, kind: str) -> dict:
    """Budget and params with the `datasets.<kind>` overrides applied."""
    budget = dict(raw.get("budget") or {})
    params = copy.deepcopy(raw.get("params") or {})
    override = (raw.get("datasets") or {}).get(kind) or {}
    budget.update(override.get("budget") or {})
    params.update(override.get("params") or {})
    budget.setdefault("trials", 10)
    budget.setdefault("epochs", 5)
    budget.setdefault("patience", 3)
    budget.setdefault("subset", None)
    budget.setdefault("timeout", None)
    return {"budget": budget, "params": params}


# ---------------------------------------------------------------- checking


def check_space(raw: dict, path: Path) -> None:
    """Raise a SpaceError for the first thing in the file that is wrong."""
    where = str(path)
    unknown(raw, TOP_KEYS, where)
    check_budget(raw.get("budget") or {}, f"{where}: budget")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{where}: 'params' must be a non-empty mapping of parameter name -> definition")
    recipes = raw.get("recipes") or {"none": []}
    check_params(params, f"{where}: params", recipes)
    for kind, override in (raw.get("datasets") or {}).items():
        if kind not in DATASET_KINDS:
            raise SpaceError(f"{where}: datasets.{kind}: unknown dataset kind; allowed: {', '.join(DATASET_KINDS)}")
        unknown(override, {"budget", "params"}, f"{where}: datasets.{kind}")
        check_budget(override.get("budget") or {}, f"{where}: datasets.{kind}.budget")
        check_params({**params, **(override.get("params") or {})}, f"{where}: datasets.{kind}.params", recipes)
    check_recipes(recipes, f"{where}: recipes")
    architectures = raw.get("architectures") or {}
    unknown(architectures, set(architectures) if isinstance(architectures, dict) else set(), f"{where}: architectures")
    for name, spec in architectures.items():
        check_architecture(spec, f"{where}: architectures.{name}")
    check_architecture_choices(raw, architectures, where)
    baselines = raw.get("baselines") or {}
    unknown(baselines, set(DATASET_KINDS), f"{where}: baselines")
    check_fidelity(raw.get("fidelity") or {}, f"{where}: fidelity")
    environment = raw.get("environment") or {}
    if not isinstance(environment, dict) or not all(isinstance(v, (str, int, float)) for v in environment.values()):
        raise SpaceError(f"{where}: environment: a mapping of variable name -> value (a string or a number), "
                         "e.g. {TF_CPU_ALLOCATOR_USE_BFC: 1}")
    if raw.get("start", "default") not in STARTS:
        raise SpaceError(f"{where}: start: {raw['start']!r}; give default (TPE's own start-up draws after the "
                         "default trial) or near_default (perturbations of the default first)")


def is_share(value: Any) -> bool:
    """A number in (0, 1] (not a boolean): a share of the images, the side or the width."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1


def check_fidelity(fidelity: dict, where: str) -> None:
    """The resource trials are pruned on (epochs or cost), the fewest epochs a trial runs, Hyperband's reduction
    factor, and the shares of the training images, image side and width an explored trial trains at."""
    unknown(fidelity, {"resource", "min_epochs", "reduction_factor", "train_subset", "val_subset", "image_size",
                       "width"}, where)
    for key in ("image_size", "width"):  # exploration's share of the side and of the filters (search/fidelity.py)
        share = fidelity.get(key, 1.0)
        if not is_share(share):
            raise SpaceError(f"{where}.{key}: the share explored trials train at, in (0, 1] (the refit trains at "
                             f"the full {key.replace('_', ' ')}), got {share!r}")
    for key, images in (("train_subset", "training"), ("val_subset", "validation")):
        subset = fidelity.get(key, 1.0)
        if subset != "auto" and not is_share(subset):
            raise SpaceError(f"{where}.{key}: auto (planned from the machine's measured speed) or a fraction of "
                             f"the {images} images in (0, 1], got {subset!r}")
    if fidelity.get("resource", "epochs") not in RESOURCES:
        raise SpaceError(f"{where}.resource: epochs or cost (training images x MFLOP, search/fidelity.py), "
                         f"got {fidelity['resource']!r}")
    for key, least in (("min_epochs", 1), ("reduction_factor", 2)):
        value = fidelity.get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise SpaceError(f"{where}.{key}: a whole number of at least {least}, got {value!r}")


def check_architecture(spec: Any, where: str) -> None:
    """A named architecture: a non-empty list of blocks with sane sizes, a known head, dense widths."""
    unknown(spec, ARCHITECTURE_KEYS, where)
    blocks = spec.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise SpaceError(f"{where}.blocks: a non-empty list of blocks, e.g. [{{filters: 32, kernel: 3, pool: max}}]")
    for index, block in enumerate(blocks):
        at = f"{where}.blocks[{index}]"
        unknown(block, BLOCK_KEYS, at)
        for key in ("filters", "kernel", "convs"):
            value = block.get(key, 1 if key != "filters" else None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpaceError(f"{at}.{key}: a positive whole number, got {value!r}")
        strides = block.get("strides", 1)
        listed = strides if isinstance(strides, list) else [strides]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in listed) or (
                isinstance(strides, list) and len(strides) != block.get("convs", 1)):
            raise SpaceError(f"{at}.strides: a positive whole number for every conv of the block, or a list of "
                             f"one per conv ({block.get('convs', 1)}), got {strides!r}")
        if block.get("pool", "param") not in BLOCK_POOLS:
            raise SpaceError(f"{at}.pool: one of {', '.join(BLOCK_POOLS)}, got {block.get('pool')!r}")
    if spec.get("head", "param") not in HEADS:
        raise SpaceError(f"{where}.head: one of {', '.join(HEADS)}, got {spec.get('head')!r}")
    dense = spec.get("dense", "param")
    if dense != "param" and (not isinstance(dense, list)
                             or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in dense)):
        raise SpaceError(f"{where}.dense: a list of layer widths (e.g. [128, 64]; [] for none) or param, got {dense!r}")
    if spec.get("dropout", "each") not in ("each", "last"):
        raise SpaceError(f"{where}.dropout: each (after every dense layer) or last (after the last one only), "
                         f"got {spec.get('dropout')!r}")
    for key in ("batch_norm", "residual"):
        if spec.get(key, "param") not in (True, False, "param"):
            raise SpaceError(f"{where}.{key}: true, false or param, got {spec.get(key)!r}")


def check_architecture_choices(raw: dict, architectures: dict, where: str) -> None:
    """Every value of an `architecture` parameter is `generated` or a name under `architectures`."""
    known = {"generated", *architectures}
    sources = [("params", raw.get("params") or {})] + [
        (f"datasets.{kind}.params", (o or {}).get("params") or {}) for kind, o in (raw.get("datasets") or {}).items()]
    for at, params in sources:
        if "architecture" in params:
            values = values_of(make_param("architecture", params["architecture"])) or ()
            missing = [v for v in values if v not in known]
            if missing:
                raise SpaceError(f"{where}: {at}.architecture: {missing} not defined under 'architectures' "
                                 f"(defined: {', '.join(sorted(known))})")


def check_baselines(space: Space) -> None:
    """This dataset's baselines name parameters of the space, with values the space allows."""
    for index, baseline in enumerate(space.baselines):
        at = f"{space.source}: baselines[{index}]"
        unknown(baseline, BASELINE_KEYS, at)
        if not baseline.get("name"):
            raise SpaceError(f"{at}: every baseline needs a name")
        at = f"{space.source}: baselines '{baseline['name']}'"
        grid = baseline.get("grid") or {}
        unknown(grid, set(space.params), f"{at}.grid")
        for name, options in grid.items():
            if not isinstance(options, list) or not options:
                raise SpaceError(f"{at}.grid.{name}: a non-empty list of values")
            for value in options:
                check_value(space, name, value, f"{at}.grid.{name}")
        unknown(baseline.get("params") or {}, set(space.params), f"{at}.params")
        for name, value in (baseline.get("params") or {}).items():
            check_value(space, name, value, f"{at}.params.{name}")


def check_value(space: Space, name: str, value: Any, where: str) -> None:
    """A value a parameter of the space can take, or a SpaceError saying what it can take."""
    param = space.params[name]
    if not is_valid(param, value):
        allowed = values_of(param) or f"[{param.low}, {param.high}]"
        raise SpaceError(f"{where}: {value!r} is not a value of '{name}' in this space (it takes {allowed})")


def baseline_trials(space: Space) -> list[tuple[str, dict]]:
    """The hand-made configurations in file order (best-known first), grids expanded, each complete and unique."""
    import itertools

    trials, seen = [], set()
    for baseline in space.baselines:
        grid = baseline.get("grid") or {}
        for values in itertools.product(*grid.values()):
            given = {**(baseline.get("params") or {}), **dict(zip(grid, values))}
            params = complete_params(space, given)
            key = tuple(sorted((k, str(v)) for k, v in params.items()))
            if key not in seen:
                seen.add(key)
                label = baseline["name"] + "".join(f" {k}={v}" for k, v in zip(grid, values))
                trials.append((label, params))
    return trials


def unknown(mapping: Any, allowed: set, where: str) -> None:
    """Reject a non-mapping or a key that is not allowed, naming the allowed ones."""
    if not isinstance(mapping, dict):
        raise SpaceError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SpaceError(f"{where}: unknown key '{key}'{hint}; allowed: {', '.join(sorted(allowed))}")


def check_budget(budget: dict, where: str) -> None:
    """Budget entries exist and have the right types and signs."""
    unknown(budget, set(BUDGET_KEYS), where)
    for key, value in budget.items():
        if key == "max_mflops" and isinstance(value, str):
            if value != "auto":
                raise SpaceError(f"{where}.max_mflops: give a number of MFLOP per image, auto (derived from the "
                                 f"measured speed and the refit's time) or null, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, BUDGET_KEYS[key]):
            raise SpaceError(f"{where}.{key}: expected a number, got {value!r}")
        if key == "refit" and not 0 <= value < 1:  # a fraction of the timeout; 0 = no refit
            raise SpaceError(f"{where}.refit: give a fraction of the timeout from 0 (no refit) to below 1, got {value}")
        if key != "refit" and value is not None and value <= 0:
            raise SpaceError(f"{where}.{key}: must be positive, got {value}")


def check_params(params: dict, where: str, recipes: dict) -> None:
    """Every parameter definition is well formed and conditions point at earlier parameters."""
    seen: list[str] = []
    for name, spec in params.items():
        param = make_param(name, spec, f"{where}.{name}")
        for parent, allowed in param.when.items():
            if parent not in seen:
                raise SpaceError(f"{where}.{name}.when: '{parent}' must be a parameter defined before '{name}'")
            parent_values = values_of(make_param(parent, params[parent]))
            bad = [v for v in allowed if parent_values is not None and v not in parent_values]
            if bad:
                raise SpaceError(f"{where}.{name}.when: {parent} never takes {bad}; it takes {parent_values}")
        if name == "augmentation":
            for recipe in values_of(param) or ():
                if recipe not in recipes:
                    raise SpaceError(f"{where}.augmentation: recipe '{recipe}' is not defined under 'recipes' "
                                     f"(defined: {', '.join(recipes)})")
        seen.append(name)


def make_param(name: str, spec: Any, where: str = "") -> Param:
    """A Param from its YAML definition; a plain scalar means a fixed value."""
    where = where or name
    if not isinstance(spec, dict):
        if isinstance(spec, (list, tuple)):
            raise SpaceError(f"{where}: a list is ambiguous; write {{type: categorical, choices: {list(spec)}}}")
        return Param(name, "fixed", value=spec, default=spec)
    unknown(spec, PARAM_KEYS, where)
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise SpaceError(f"{where}.type: must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise SpaceError(f"{where}.when: expected a mapping of parent parameter -> allowed values")
    when = {k: tuple(v if isinstance(v, list) else [v]) for k, v in when.items()}
    if kind == "fixed":
        if "value" not in spec:
            raise SpaceError(f"{where}: a fixed parameter needs 'value'")
        return Param(name, kind, value=spec["value"], default=spec["value"], when=when)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}.choices: must be a non-empty list")
        default = spec.get("default", choices[0])
        if default not in choices:
            raise SpaceError(f"{where}.default: {default!r} is not one of the choices {choices}")
        return Param(name, kind, choices=tuple(choices), default=default, when=when)
    return make_range(name, kind, spec, where, when)


def make_range(name: str, kind: str, spec: dict, where: str, when: dict) -> Param:
    """An int or float range, checked: numbers, low <= high, positive bounds for log scale."""
    number = int if kind == "int" else (int, float)
    for key in ("low", "high"):
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, number):
            raise SpaceError(f"{where}.{key}: a {kind} range needs a number, got {value!r}")
    low, high = spec["low"], spec["high"]
    if low > high:
        raise SpaceError(f"{where}: low ({low}) > high ({high}); low must not exceed high")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise SpaceError(f"{where}: a log-scale range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0):
        raise SpaceError(f"{where}.step: must be a positive {kind}, got {step!r}")
    if step is not None and log:
        raise SpaceError(f"{where}: 'step' and 'log' cannot be combined")
    default = spec.get("default", low if not log else math.sqrt(low * high))
    if not low <= default <= high:
        raise SpaceError(f"{where}.default: {default} is outside [{low}, {high}]")
    grid = tuple(spec.get("grid") or ())
    return Param(name, kind, low=low, high=high, step=step, log=log, default=default, when=when, grid=grid)


def check_recipes(recipes: Any, where: str) -> None:
    """Each recipe is a list of albumentations transforms that can be built with their arguments."""
    from runners.augment import build_recipe  # albumentations is imported only when a space is checked

    unknown(recipes, set(recipes) if isinstance(recipes, dict) else set(), where)
    for name, steps in recipes.items():
        try:
            build_recipe(steps or [], image_size=32)
        except (TypeError, ValueError, AttributeError, KeyError) as err:
            raise SpaceError(f"{where}.{name}: {err}") from None


def values_of(param: Param) -> tuple | None:
    """The finite values a parameter can take, or None for a continuous range."""
    if param.type == "fixed":
        return (param.value,)
    if param.type == "categorical":
        return param.choices
    if param.type == "int" and not param.log:
        return tuple(range(int(param.low), int(param.high) + 1, int(param.step or 1)))
    return None


# ---------------------------------------------------------------- suggesting


def suggest_params(trial, space: Space) -> dict:
    """Ask an Optuna trial for one value of every active parameter, in file order."""
    params: dict = {}
    for p in space.params.values():
        if not p.active(params):
            continue
        if p.type == "fixed":
            params[p.name] = p.value
        elif p.type == "categorical":
            params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.type == "int":
            params[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    return params


def replace_choices(param: Param, choices: list, default: Any) -> Param:
    """A categorical parameter narrowed to some of its choices (a runner's narrow_choices, e.g. --backbone)."""
    return dataclasses.replace(param, choices=tuple(choices), default=default)


def default_params(space: Space) -> dict:
    """The space's default configuration: every active parameter at its default."""
    params: dict = {}
    for p in space.params.values():
        if p.active(params):
            params[p.name] = p.default
    return params


def complete_params(space: Space, given: dict) -> dict:
    """Fill a partial configuration with defaults and drop what is inactive or invalid in this space."""
    params: dict = {}
    for p in space.params.values():
        if not p.active(params):
            continue
        value = given.get(p.name, p.default)
        params[p.name] = value if is_valid(p, value) else p.default
    return params


def is_valid(p: Param, value: Any) -> bool:
    """True when a value lies in a parameter's domain."""
    if p.type == "fixed":
        return value == p.value
    if p.type == "categorical":
        return value in p.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return p.low <= value <= p.high


def grid_of(space: Space) -> dict[str, list]:
    """Values for Optuna's GridSampler: choices, small int ranges, or a range's `grid` (else low, mid, high)."""
    grid = {}
    for p in space.params.values():
        if p.type == "fixed":
            continue
        if p.grid:
            grid[p.name] = list(p.grid)
        elif (values := values_of(p)) is not None:
            grid[p.name] = list(values)
        else:
            mid = math.sqrt(p.low * p.high) if p.log else (p.low + p.high) / 2
            grid[p.name] = sorted({p.low, mid, p.high})
    return grid


def fixed_params(space: Space) -> dict:
    """Parameters with one value: Optuna never sees them, but every run records them."""
    return {p.name: p.value for p in space.params.values() if p.type == "fixed"}


# ---------------------------------------------------------------- Keras Tuner


def declare_hyperparameters(hp, space: Space) -> dict:
    """Declare every parameter on a keras_tuner HyperParameters (conditions as scopes); return the active values.

    The same Param list that `suggest_params` gives Optuna: choices become Choice, ranges Int or Float (log
    scale as sampling="log"), fixed values Fixed, and `when:` one conditional scope per parent."""
    from contextlib import ExitStack

    params: dict = {}
    for p in space.params.values():
        with ExitStack() as scopes:
            # Keras Tuner nests scopes and cannot find a second parent declared outside the first's scope: the
            # first parent's scope is declared, and `p.active` below applies every condition to the values
            for parent, allowed in list(p.when.items())[:1]:
                scopes.enter_context(hp.conditional_scope(parent, list(allowed)))
            value = declare_one(hp, p)
        if p.active(params):
            params[p.name] = value
    return params


def declare_one(hp, p: Param):
    """One parameter as Keras Tuner's Fixed, Choice, Int or Float; its value (None when inactive)."""
    if p.type == "fixed":
        return hp.Fixed(p.name, p.value)
    if p.type == "categorical":
        value = hp.Choice(p.name, list(p.choices), default=p.default)
        # Keras Tuner stores true/false choices as 1/0 (bool is an int): give back the space's own value
        return None if value is None else p.choices[list(p.choices).index(value)]
    sampling = "log" if p.log else "linear"
    if p.type == "int":
        return hp.Int(p.name, int(p.low), int(p.high), step=int(p.step) if p.step else None, sampling=sampling,
                      default=int(p.default))
    return hp.Float(p.name, float(p.low), float(p.high), step=p.step, sampling=sampling, default=float(p.default))
