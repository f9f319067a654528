"""Reads untrusted JSON (a bundle's manifest) into typed values: each field checked for type and range, or a
``BundleError`` naming the field, the bad value and the fix. Also bounds size and nesting before parsing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from edgekit.runtimes.errors import BundleError

T = TypeVar("T")
MAX_DEPTH = 32  # nesting a manifest may have (ours: 6)
HINT = "HINT: re-export the bundle with this edgekit version."


def loads(raw: bytes, where: str, max_bytes: int) -> Any:
    """Parse JSON bytes; refuse oversize input, deep nesting, huge numbers and invalid text with a BundleError."""
    if len(raw) > max_bytes:
        raise BundleError(f"{where} is {len(raw)} bytes, above the limit of {max_bytes}. {HINT}")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digit limits
        raise BundleError(f"{where} is not valid JSON ({type(e).__name__}: {str(e)[:200]}). {HINT}") from None
    check_depth(data, where)
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def walk(data: Any) -> Iterator[tuple[Any, int]]:
    """Every value of parsed JSON, object keys included, with its depth; iterative, so a hostile nesting cannot
    exhaust the stack (stop early by raising)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        if isinstance(node, dict):
            for k, v in node.items():
                yield k, depth + 1
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def check_depth(data: Any, where: str, limit: int = MAX_DEPTH) -> None:
    if any(depth > limit for _, depth in walk(data)):
        raise BundleError(f"{where} nests deeper than {limit} levels. {HINT}")


class Reader:
    """Typed access to one JSON object; ``where`` names it in errors (e.g. "edgekit.json: tokens")."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise BundleError(f"{where} must be a JSON object, got {_kind(data)}. {HINT}")
        self.data, self.where = data, where

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.data or self.data[key] is None:
            if required:
                raise BundleError(f"{self.where}: '{key}' is missing. {HINT}")
            return None
        return self.data[key]

    def _fail(self, key: str, want: str, value: Any) -> BundleError:
        return BundleError(f"{self.where}: '{key}' must be {want}, got {_show(value)}. {HINT}")

    def str(self, key: str, required: bool = True, default: str | None = None,
            choices: tuple[str, ...] | None = None, max_len: int = 1 << 20) -> Any:
        v = self._get(key, required)
        if v is None:
            return default
        if not isinstance(v, str) or len(v) > max_len:
            raise self._fail(key, f"a string of at most {max_len} characters", v)
        if choices is not None and v not in choices:
            raise self._fail(key, f"one of {', '.join(choices)}", v)
        return v

    def int(self, key: str, required: bool = True, default: int | None = None, lo: int = 0,
            hi: int = 1 << 31) -> Any:
        v = self._get(key, required)
        if v is None:
            return default
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self._fail(key, f"an integer in [{lo}, {hi}]", v)
        return v

    def bool(self, key: str, default: bool) -> bool:
        v = self._get(key, False)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self._fail(key, "true or false", v)
        return v

    def strings(self, key: str, required: bool = True, max_items: int = 4096) -> tuple[str, ...]:
        v = self._get(key, required)
        if v is None:
            return ()
        if not isinstance(v, list) or len(v) > max_items or not all(isinstance(s, str) for s in v):
            raise self._fail(key, f"a list of at most {max_items} strings", v)
        return tuple(v)

    def ints(self, key: str, lo: int = 0, hi: int = 1 << 31) -> tuple[int, ...]:
        v = self._get(key, False)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) and lo <= i <= hi
                                              for i in v):
            raise self._fail(key, f"a list of integers in [{lo}, {hi}]", v)
        return tuple(v)

    def choices(self, key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
        """A list of distinct strings, each one of ``allowed`` (empty when absent)."""
        v = self._get(key, False)
        if v is None:
            return ()
        if not isinstance(v, list) or len(set(map(repr, v))) != len(v) or not all(x in allowed for x in v):
            raise self._fail(key, f"a list of distinct values among {', '.join(allowed)}", v)
        return tuple(v)

    def obj(self, key: str, required: bool = True) -> Reader | None:
        v = self._get(key, required)
        return None if v is None else Reader(v, f"{self.where}: {key}")

    def mapping(self, key: str, value: Callable[[Any], bool] = lambda v: True, want: str = "an object") -> dict:
        v = self._get(key, False)
        if v is None:
            return {}
        if not isinstance(v, dict) or not all(value(x) for x in v.values()):
            raise self._fail(key, want, v)
        return dict(v)

    def each(self, key: str, make: Callable[[Reader], T]) -> dict[str, T]:
        """An object of objects, each read by ``make``."""
        v = self._get(key, True)
        if not isinstance(v, dict) or not v:
            raise self._fail(key, "a non-empty object", v)
        return {k: make(Reader(x, f"{self.where}: {key}.{k}")) for k, x in v.items()}


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), type(v).__name__)


def _show(v: Any) -> str:
    text = repr(v) if not isinstance(v, (dict, list)) else _kind(v)
    return text if len(text) <= 80 else text[:77] + "..."


def is_hex_digest(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
