"""TOML configuration files: ``--config FILE.toml`` supplies options, flags override them."""

from __future__ import annotations

import tomllib

from matclust.errors import InputError


def load_config(path: str, allowed: dict[str, str]) -> dict:
    """Read a flat TOML table of options.

    ``allowed`` maps accepted key spellings (``memory-limit`` and ``memory_limit``) to the
    command's parameter names. Unknown keys are an error naming the key.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: malformed TOML: {exc}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read config: {exc}") from None
    out = {}
    for key, value in data.items():
        if key not in allowed:
            names = ", ".join(sorted({k.replace("_", "-") for k in allowed}))
            raise InputError(f"{path}: unknown config key '{key}' (known: {names})")
        if isinstance(value, dict):
            raise InputError(f"{path}: config key '{key}' must be a value, not a table")
        out[allowed[key]] = value
    return out
