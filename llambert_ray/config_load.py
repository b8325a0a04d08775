"""A RunConfig from a YAML file (or the defaults), with the CLI's overrides: flags (dotted keys) and `--set KEY=VALUE`
items, each wrong key or value refused with a message naming it and the fix."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llambert_ray.config import ConfigError, RunConfig


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid config in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    lines.append("fix: correct these keys (see configs/*.yaml for examples).")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if node.get(k) is None:  # absent, or an optional section left null in the YAML (test:, extra:)
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (CorpusConfig for `CorpusConfig | None`), or None for a plain value."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _check_key(dotted: str) -> None:
    """Refuse a dotted key the config tree does not have, naming the valid keys at the point it goes wrong."""
    model: type[BaseModel] = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"--set {dotted}: {where} has no key {part!r}; valid keys: {', '.join(fields)}")
        sub = _section(fields[part].annotation)
        if sub is None:
            is_mapping = any(typing.get_origin(t) is dict for t in (fields[part].annotation,
                                                                    *typing.get_args(fields[part].annotation)))
            if i < len(parts) - 1 and not is_mapping:  # a key below a dict field (corpus.filters.split) is data
                key = ".".join(parts[:i + 1])
                raise ConfigError(f"--set {dotted}: {key} is a value, not a section; fix: --set {key}=VALUE")
            return
        model = sub


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` items (KEY dotted: annotate.shots, corpus.filters) as overrides for load_config. VALUE is
    read as YAML: 2 is a number, true a flag, null (or nothing) None, [a, b] a list, {split: [test]} a mapping."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE; fix: e.g. --set annotate.shots=2")
        _check_key(key)
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); fix: "
                              f"quote it, e.g. --set 'name=\"a: b\"'") from None
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from YAML (or defaults) and apply dotted overrides like {"annotate.mode": "score"}, then
    the `--set KEY=VALUE` items of `sets` (see parse_sets).

    Overrides whose value is None are ignored, so CLI flags that were not given leave the YAML alone; a `--set`
    value of null is applied (it is how a key is set to null).
    """
    explicit = parse_sets(sets)  # a wrong key fails before the YAML is read
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist; fix: pass the path of a YAML file, "
                              f"e.g. configs/demo.yaml")
        if not p.is_file():
            kind = "a folder" if p.is_dir() else "not a regular file (a device, pipe or socket)"
            raise ConfigError(f"config {p} is {kind}; fix: pass the path of a YAML file, e.g. configs/demo.yaml")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}; fix: correct the syntax") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text; fix: save it as UTF-8") from e
        if loaded is None:
            raise ConfigError(f"config file {p} is empty; fix: give it sections (corpus:, annotate:, ...) as in "
                              f"configs/demo.yaml, or leave --config out and pass flags")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (corpus:, annotate:, ...), "
                              f"not a {type(loaded).__name__}; fix: start it with top-level keys like `corpus:`")
        tree = loaded
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    for dotted, value in explicit.items():
        _set_dotted(tree, dotted, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source + (" with --set" if explicit else ""), e)) from None
