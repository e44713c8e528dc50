"""Resolving a Config: dataclass defaults <- named profile (``profiles/<task>/<name>.yaml``) <- recipe YAML
(``--config``) <- CLI aliases (``--output-dir`` ...) <- ``--set key.sub=value`` overrides, each value coerced to
its field's type. Problems of type or shape raise ConfigError at once; checks of values against the disk, the
environment and each other are preflight.py's, so a dry-run can print the config beside its problems.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mellama_train.config.hub import local_path as hub_local_path
from mellama_train.config.llamafactory import resolve_entry
from mellama_train.config.schema import Config, ConfigError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""This package's directory: in a checkout src/mellama_train, in a regular install site-packages/mellama_train."""
PROFILES_DIR = PACKAGE_DIR / "profiles"
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_data"
# `${sample_data}` in a path resolves to the data shipped inside the package, so the tiny profile works from
# any working directory and from an installed wheel.
SAMPLE_DATA_VAR = "${sample_data}"
NULL = object()
"""An alias value that sets a field to null (a plain None means "flag not given")."""


# ---- building a Config from nested dicts ---------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _as_yaml_text(value: Any) -> Any:
    """A YAML scalar as the text it was written as (true, 3, 1.5); anything else unchanged (validate names it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int | float) else value


def _coerce(value: Any, typ: Any, where: str, problems: list[str]) -> Any:
    """Check/convert one YAML value against a dataclass field type; record a problem instead of raising."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, problems)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            problems.append(f"{where} must be a mapping (got {type(value).__name__}); see the profile YAMLs")
            return typ()
        return _build(typ, value, where, problems)
    if origin is dict and typing.get_args(typ)[1] == list[str]:
        # `where: {note_type: DS}` means one allowed value; numbers and booleans compare as YAML writes them
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            problems.append(f"{where} must be a mapping of field names to lists of values (got {value!r})")
            return {}
        return {
            k: [_as_yaml_text(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in value.items()
        }
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            problems.append(f"{where} must be a mapping of names to names (got {value!r})")
            return {}
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if isinstance(value, (str, int, float)) and item_type is str:
            value = [value]  # `paths: /data/x.jsonl` means a one-element list
        if not isinstance(value, list):
            problems.append(f"{where} must be a list (got {value!r})")
            return []
        return [_coerce(v, item_type, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads `8e-6` (no dot) as a string
        except ValueError:
            pass
    if typ is int and isinstance(value, str):
        try:
            value = float(value)  # `--set train.train_tokens=129e9`: YAML reads it as a string
        except ValueError:
            pass
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)  # `train_tokens: 129e9`
    if typ in (int, float, str, bool) and not (
        isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    ):
        problems.append(f"{where} must be {typ.__name__} (got {value!r})")
        return None
    return value


def _build(cls: type, data: dict[str, Any], where: str, problems: list[str]) -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            hint = difflib.get_close_matches(key, types_, n=1)
            fix = f"did you mean `{hint[0]}`?" if hint else f"known fields: {', '.join(types_)}"
            problems.append(f"{where}.{key}: unknown field; {fix}".lstrip("."))
            continue
        kwargs[key] = _coerce(value, types_[key], f"{where}.{key}".lstrip("."), problems)
    return cls(**{k: v for k, v in kwargs.items() if v is not None or k in _nullable(cls)})


def _nullable(cls: type) -> set[str]:
    return {
        k for k, t in _field_types(cls).items() if typing.get_origin(t) in (typing.Union, types.UnionType)
    }


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key == "sources" and isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = _merge_sources(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


FILE_BOUND_SOURCE_FIELDS = (
    "license",
    "eval_paths",
    "include",
    "exclude",
    "text_field",
    "where",
    "format",
    "columns",
    "dataset",
)
"""Source fields a recipe source that gives its own `paths` does not inherit from the profile's source."""


def _merge_sources(base: list[Any], over: list[Any]) -> list[Any]:
    """A recipe's sources replace the profile's list, but a recipe source named like a profile source inherits
    its unset fields: a recipe may give only `{name: pubmed, paths: [...]}` and keep the profile's weight."""
    by_name = {s.get("name"): s for s in base if isinstance(s, dict)}
    merged = []
    for src in over:
        if not isinstance(src, dict):
            merged.append(src)
            continue
        inherited = dict(by_name.get(src.get("name"), {}))
        if "paths" in src:
            # These describe the profile's files: new files need their own. Inheriting the tiny profile's
            # held-out files would evaluate (and probe forgetting on) the sample data, not the user's.
            for key in FILE_BOUND_SOURCE_FIELDS:
                if key not in src:
                    inherited.pop(key, None)
        merged.append(_deep_merge(inherited, src))
    return merged


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found; check the --config/--profile path"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections (model, data, optim, train)"])
    return data


def profile_names(task: str = "pretrain") -> list[str]:
    return sorted(p.stem for p in (PROFILES_DIR / task).glob("*.yaml"))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply `a.b.c=value`; list items are addressed by index (`data.sources.0.weight`) or by source name
    (`data.sources.pubmed.weight`)."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = (
                int(part)
                if part.isdigit()
                else next(
                    (j for j, s in enumerate(node) if isinstance(s, dict) and s.get("name") == part), None
                )
            )
            if idx is None or idx >= len(node):
                names = [s.get("name") for s in node if isinstance(s, dict)]
                raise ConfigError(
                    [f"--set {dotted}: no list item `{part}` (have {names}); use an index or a name"]
                )
            if last:
                node[idx] = value
            node = node[idx]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected key.sub=value, e.g. --set optim.lr=1e-5"])
    key, raw = text.split("=", 1)
    # YAML parsing gives numbers, booleans, null and lists (`[a, b]`) their types.
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(
            [
                f"--set {text!r}: the value is not valid YAML ({getattr(exc, 'problem', None) or 'unparsable'});"
                " complete it (a list is [a, b], a mapping {a: 1}) or quote it to pass a string"
            ]
        ) from None


def resolve(
    profile: str = "tiny",
    recipe: str | None = None,
    overrides: list[str] | None = None,
    aliases: dict[str, Any] | None = None,
    task: str = "pretrain",
) -> Config:
    """Resolve profile <- recipe <- aliases <- --set into a Config. Type problems raise ConfigError at once;
    value checks are `validate()`'s job so a dry-run can print the config beside its problems."""
    profile_path = PROFILES_DIR / task / f"{profile}.yaml"
    if not profile_path.exists():
        raise ConfigError(
            [f"--profile {profile}: unknown {task} profile; choose one of {', '.join(profile_names(task))}"]
        )
    tree = load_yaml(profile_path)
    given: set[str] = set()  # dotted keys the user set (recipe, flags, --set), as against the profile
    if recipe:
        recipe_tree = load_yaml(recipe)
        given |= _dotted_keys(recipe_tree)
        tree = _deep_merge(tree, recipe_tree)
    for key, value in (aliases or {}).items():
        if value is not None:
            given.add(key)
            _set_dotted(tree, key, None if value is NULL else value)
    for text in overrides or []:
        key, value = parse_override(text)
        given.add(key)
        _set_dotted(tree, key, value)
    _drop_orphan_probe(tree, profile, given)
    tree["profile"] = profile
    tree["task"] = task
    problems: list[str] = []
    cfg = _build(Config, tree, "", problems)
    if problems:
        raise ConfigError(problems)
    _expand_sample_paths(cfg)
    _read_dataset_info(cfg)
    cfg.train.ds_config = _find_ds_config(cfg.train.ds_config)
    return cfg


def _read_dataset_info(cfg: Config) -> None:
    """Sources named by a LLaMA-Factory dataset_info.json entry take its file and column names (resolution,
    not validation: --dry-run then shows the files and columns a run reads)."""
    problems = []
    for src in cfg.data.sources:
        if src.dataset and cfg.kind.records:
            try:
                src.paths, src.columns = resolve_entry(src.paths, src.dataset, src.columns)
            except ValueError as err:
                problems.append(f"data.sources[{src.name}].dataset: {err}")
    if problems:
        raise ConfigError(problems)


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + str(key))
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _drop_orphan_probe(tree: dict[str, Any], profile: str, given: set[str]) -> None:
    """A profile's forgetting probe names one of the profile's sources, with the profile's held-out files; a
    recipe with other sources, or that gives the probe's source new paths and no held-out files, must not be
    stopped by it. Turned off with a note, unless the user set the probe (then validate() names the problem)."""
    train = tree.get("train")
    probe = train.get("forgetting_source") if isinstance(train, dict) else None
    if probe is None or "train.forgetting_source" in given:
        return
    sources = (tree.get("data") or {}).get("sources") or []
    names = [src.get("name") for src in sources if isinstance(src, dict)]
    source = next((src for src in sources if isinstance(src, dict) and src.get("name") == probe), None)
    if source is not None and source.get("eval_paths"):
        return
    why = (
        f"the recipe has no source named {probe}"
        if source is None
        else f"the recipe's {probe} has no eval_paths"
    )
    train["forgetting_source"] = None
    log.warning(
        "note: the %s profile's forgetting probe (train.forgetting_source: %s) is off: %s; set"
        " train.forgetting_source to one of [%s] that has eval_paths to turn it on",
        profile,
        probe,
        why,
        ", ".join(map(str, names)),
    )


def _find_ds_config(path: str) -> str:
    """`ds_configs/zero3.json` is relative to the repo root in every documented command; accept it from any
    working directory, and from a regular (non-editable) install, by falling back to the copies this package
    carries (package data: ds_configs/ inside the package is the repo's ds_configs/)."""
    if Path(path).exists() or Path(path).is_absolute():
        return path
    parts = Path(path).parts
    if parts and parts[0] == "ds_configs" and (packaged := PACKAGE_DIR.joinpath(*parts)).exists():
        return str(packaged)
    return path


def _expand_sample_paths(cfg: Config) -> None:
    def expand(p: str | None) -> str | None:
        return p.replace(SAMPLE_DATA_VAR, str(SAMPLE_DATA_DIR)) if p else p

    # A Hub id (meta-llama/Llama-2-13b-hf) becomes its snapshot directory in the Hugging Face cache (hub.py).
    cfg.model.path = hub_local_path(expand(cfg.model.path))
    cfg.model.tokenizer = hub_local_path(expand(cfg.model.tokenizer))
    for src in cfg.data.sources:
        src.paths = [expand(p) for p in src.paths]
        src.eval_paths = [expand(p) for p in src.eval_paths]
