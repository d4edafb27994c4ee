"""TOML configuration files: ``--config FILE.toml`` supplies options, flags override them."""

from __future__ import annotations

import tomllib

from matclust.errors import InputError


#: The TOML types a value may have, by the kind of option it sets. A float for an integer
#: option or a boolean for a number would otherwise be converted silently (2.7 -> 2, true -> 1).
_ACCEPTED = {"integer": (int,), "number": (int, float), "flag": (bool,), "text": (str, int, float)}


def load_config(path: str, allowed: dict[str, str], kinds: dict[str, str] | None = None) -> dict:
    """Read a flat TOML table of options.

    ``allowed`` maps accepted key spellings (``memory-limit`` and ``memory_limit``) to the
    command's parameter names; ``kinds`` maps parameter names to ``integer``, ``number``,
    ``flag`` or ``text``. Unknown keys and values of the wrong type are errors naming the key.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: config file is a folder") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: malformed TOML: {exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a TOML file (not UTF-8 text)") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    out = {}
    for key, value in data.items():
        if key not in allowed:
            names = ", ".join(sorted({k.replace("_", "-") for k in allowed}))
            raise InputError(f"{path}: unknown config key '{key}' (known: {names})")
        if isinstance(value, dict):
            raise InputError(f"{path}: config key '{key}' must be a value, not a table")
        kind = (kinds or {}).get(allowed[key])
        accepted = _ACCEPTED.get(kind)
        if accepted is not None and (not isinstance(value, accepted)
                                     or (kind != "flag" and isinstance(value, bool))):
            raise InputError(f"{path}: config key '{key}' must be {_describe(kind)}, "
                             f"got {value!r}")
        out[allowed[key]] = value
    return out


def _describe(kind: str) -> str:
    return {"integer": "an integer", "number": "a number", "flag": "true or false",
            "text": "a string"}[kind]
