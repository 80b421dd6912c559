"""What an override is: `--set KEY=VALUE` strings read as values, the experiment's name, and the
arguments that make `dvc exp run -S` write exactly the validated values (desensitize.orchestration.experiment
runs them)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import yaml

from desensitize.config import Params, get_dotted
from desensitize.errors import DesensitizeError

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (`--set`) as overrides; each value is read as YAML (0.5, [4, 7], restorability)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DesensitizeError(f"--set {item!r}: expected KEY=VALUE, e.g. masks.search.hidden_ratios=[0.75,0.875]")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise DesensitizeError(f"--set {item!r}: the value is not valid YAML") from None
    return overrides


def experiment_name(*parts: str, limit: int = 64) -> str:
    """A DVC experiment name (a git ref name) from readable parts: other characters become `-`, and the
    parts but the last (a unique tail, kept whole) are cut to fit `limit` characters, so that `dvc exp
    show` can print it."""
    clean = [_UNSAFE_NAME.sub("-", part).replace("..", ".").strip(".-") for part in parts]
    clean = [part.removesuffix(".lock") for part in clean if part]
    if not clean:
        raise DesensitizeError(f"{parts!r}: no experiment name can be made of it")
    *head, tail = clean
    room = limit - len(tail) - 1
    lead = "-".join(head)[: max(room, 0)].rstrip(".-")
    return f"{lead}-{tail}" if lead else tail


def default_name() -> str:
    """For a run that has no name of its own (`desensitize repro --set`): the time and a random tail."""
    return f"repro-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def hydra_value(value: Any) -> str:
    """`value` as DVC's `-S` reads it (Hydra's override grammar), so DVC writes exactly this value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        mantissa, e, exponent = repr(value).partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else repr(value)  # 1e-05 reads as text
    if isinstance(value, str):
        if "${" in value:
            raise DesensitizeError(f"{value!r}: DVC's -S would read '${{' as an interpolation")
        # Quoted: a backslash escapes only before a quote or at the end, so only there is it doubled.
        escaped = re.sub(r"(\\+)(?='|$)", lambda match: match.group(1) * 2, value)
        return "'" + escaped.replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ", ".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {hydra_value(item)}" for key, item in value.items()) + "}"
    raise DesensitizeError(f"{value!r}: a {type(value).__name__} cannot be passed to DVC's -S")


def set_args(params: Params, overrides: dict[str, Any]) -> list[str]:
    """`-S ++key=value` for each override, with the validated value (e.g. "0.5" from a UI becomes 0.5),
    so DVC records what ran. `++` sets a key whether or not the file has it yet."""
    validated = params.model_dump(mode="json")
    args: list[str] = []
    for key in overrides:
        args += ["-S", f"++{key}={hydra_value(get_dotted(validated, key))}"]
    return args
