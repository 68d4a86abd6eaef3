"""Strings and YAML to typed values for config.py: the safe YAML loader, ``key=value`` overrides, coercion
of a value to its key's type, and the closest known key for a typo. Knows nothing of the config's sections."""
from __future__ import annotations

import difflib
import reprlib
from typing import Any

import yaml

from .errors import ConfigError


def closest_key(key: str, keys: list[str]) -> str | None:
    """The known key a typo most likely meant, or None when nothing is close (no unrelated suggestion)."""
    m = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if m:
        return m[0]
    leaf = key.split(".")[-1]
    same_leaf = [k for k in keys if k.split(".")[-1] == leaf]  # right name, wrong section
    if same_leaf:
        return same_leaf[0]
    m = difflib.get_close_matches(leaf, [k.split(".")[-1] for k in keys], n=1, cutoff=0.75)
    return next(k for k in keys if k.split(".")[-1] == m[0]) if m else None


def coerce(key: str, value: Any, typ: type, meta=None) -> Any:
    meta = meta or {}
    if meta.get("auto") and isinstance(value, str) and value.strip().lower() == "auto":
        return -1  # AUTO: resolved at start, on the node that runs (distributed/env.py)
    if meta.get("bools") and isinstance(value, bool):
        return "true" if value else "false"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
    raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {type(value).__name__} {reprlib.repr(value)}")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _Loader(yaml.SafeLoader):
    """safe_load, except that an alias may only repeat a scalar: aliases of lists or mappings nested in each
    other ("billion laughs") expand exponentially as soon as anything walks or prints the value."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            node = self.anchors.get(anchor)
            if node is not None and not isinstance(node, yaml.ScalarNode):
                raise ConfigError(f"YAML alias *{anchor} repeats a list or mapping; only single values may be "
                                  "aliased in a config (write the list or mapping out)")
        return super().compose_node(parent, index)


def yaml_load(stream):
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
