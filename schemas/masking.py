"""Credentials masked wherever they would be shown: the one rule every error message, log line and stored record
goes through.

A value is a credential when the name it sits under looks like one (secret, password, token, access_key, session),
whatever its type and however deep: in a mapping, in a list of mappings (a YAML list given where a mapping was
meant), or written out in a string (a repr of a dict inside an error message, `key=value`, `key: value`).
SecretStr values are credentials wherever they are. Absent (None) values stay None, so a record still shows that
no key was given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, SecretStr

MASK = "***"
# Names whose values are credentials, whatever their type (a plain str in a dict spec, a SecretStr in a model).
SECRET_KEY = re.compile(r"secret|password|token|access_key|session", re.IGNORECASE)
MAX_DEPTH = 50  # a spec is a few levels deep; deeper data (an alias bomb already refused) is cut, not walked

# In text: a name (a whole run of word characters, taken possessively, so the search is linear in any text), quoted
# or not, then `:` or `=`, then its value, looked at without being consumed (a name whose value holds other names,
# `input_value=[{'secret_access_key': ...}]`, must not hide them): quoted (possibly cut short by a bounded repr, so
# the closing quote is optional), a list, or bare up to a separator.
_NAMED_VALUE = re.compile(
    r"""(?<![\w.-])(?P<name>[\w.-]++)(?P<close>['"]?)\s*+[:=]\s*+"""
    r"""(?=(?P<value>'[^'\n]*+'?|"[^"\n]*+"?|\[[^\]\n]*+\]?|[^\s,;'"(){}\[\]]++))"""
)


def is_secret_key(name: Any) -> bool:
    """True when a value under `name` is a credential."""
    return isinstance(name, str) and SECRET_KEY.search(name) is not None


def mask_secrets(value: Any, _depth: int = 0) -> Any:
    """`value` with every credential replaced by MASK: values under secret-looking names in mappings (and pydantic
    models, dumped), in lists and tuples at any depth, SecretStr values, and `name: value` / `name=value` /
    `'name': 'value'` written inside strings."""
    if _depth > MAX_DEPTH:
        return MASK
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, BaseModel):
        return mask_secrets({name: getattr(value, name) for name in type(value).model_fields}, _depth + 1)
    if isinstance(value, Mapping):
        return {
            k: MASK if is_secret_key(k) and v is not None else mask_secrets(v, _depth + 1) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        masked = [mask_secrets(v, _depth + 1) for v in value]
        return masked if isinstance(value, list) else tuple(masked)
    return value


def mask_text(text: str) -> str:
    """`text` with the value after every secret-looking name masked (`'secret_access_key': 'abc'` becomes
    `'secret_access_key': '***'`)."""
    if not SECRET_KEY.search(text):  # the common case: nothing to look at
        return text
    out, done = [], 0
    for match in _NAMED_VALUE.finditer(text):
        value = match["value"]
        if match.start() < done or not is_secret_key(match["name"]) or _already_masked(value):
            continue
        quote = value[0] if value[0] in "'\"" else ""  # a list is masked whole
        out += [text[done : match.end()], f"{quote}{MASK}{quote}"]
        done = match.end("value")
    return "".join(out) + text[done:]


def _already_masked(value: str) -> bool:
    return value in ("None", "null", "SecretStr") or value.strip("'\"") in (MASK, "**********")


def unmasked_secrets(data: Any, path: str = "spec") -> list[str]:
    """Paths of secret-looking keys whose value is neither None nor masked (empty when the data is clean)."""
    found: list[str] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            where = f"{path}.{key}"
            if is_secret_key(key) and value not in (None, MASK, "**********"):
                found.append(where)
            else:
                found.extend(unmasked_secrets(value, where))
    elif isinstance(data, list | tuple):
        for index, value in enumerate(data):
            found.extend(unmasked_secrets(value, f"{path}[{index}]"))
    return found
