"""Compression specs: `name:key=value:key=value`, several joined by commas (optionally in brackets), or a
YAML-style list of such strings / {name: {key: value}} mappings.

    fastervlm:keep=0.1
    [hired:rho=0.2, fastv:layer=2:keep=0.5]
    ["fastervlm:count=58", {"fastv": {"layer": 2, "keep": 0.5}}]

Values are parsed as int, then float, then true/false/none, else kept as strings. The grammar is ours
(lmms-eval's `--model_args a=1,b=2` and vLLM's `--override` flags are the models we follow).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import InputError


@dataclass(frozen=True)
class MethodSpec:
    """One method and its parameters, e.g. MethodSpec("fastervlm", {"keep": 0.1})."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return ":".join([self.name, *(f"{k}={_fmt(v)}" for k, v in self.params.items())])


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "/".join(_fmt(x) for x in v)
    return str(v)


def parse_value(text: str) -> Any:
    t = text.strip()
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if "/" in t:  # a list of numbers, e.g. a searched schedule "1/1/0.5/0.25"; paths stay strings
        parts = [parse_value(x) for x in t.split("/")]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in parts):
            return tuple(parts)
    return t


def _one(text: str) -> MethodSpec:
    parts = [p.strip() for p in text.strip().split(":")]
    name = parts[0]
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise InputError(f"bad compression spec {text!r}: expected name:key=value:..., e.g. fastervlm:keep=0.1")
    params: dict[str, Any] = {}
    for p in parts[1:]:
        if "=" not in p:
            raise InputError(f"bad compression parameter {p!r} in {text!r}: expected key=value")
        k, v = p.split("=", 1)
        k = k.strip()
        if not k or k in params:
            raise InputError(f"bad or repeated parameter name {k!r} in {text!r}")
        params[k] = parse_value(v)
    return MethodSpec(name, params)


def parse_spec(spec: Any) -> tuple[MethodSpec, ...]:
    """A spec string, a list of strings/mappings, a MethodSpec or None -> MethodSpecs (empty = none)."""
    if spec is None:
        return ()
    if isinstance(spec, MethodSpec):
        return (spec,)
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("[") and s.endswith("]"):
            s = s[1:-1]
        if s.lower() in ("", "none", "off"):
            return ()
        return tuple(_one(x) for x in s.split(","))
    if isinstance(spec, Mapping):
        if len(spec) != 1:
            raise InputError(f"a compression mapping holds one method name, got {list(spec)}")
        (name, params), = spec.items()
        if params is not None and not isinstance(params, Mapping):
            raise InputError(f"parameters of {name!r} must be a mapping, got {params!r}")
        return (MethodSpec(str(name), dict(params or {})),)
    if isinstance(spec, Sequence):
        return tuple(m for item in spec for m in parse_spec(item))
    raise InputError(f"a compression spec is a string or a list, got {type(spec).__name__}")


def format_spec(methods: Sequence[MethodSpec]) -> str:
    """The canonical string of a parsed spec ("none" when empty)."""
    return ",".join(str(m) for m in methods) or "none"
