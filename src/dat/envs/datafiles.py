"""Reading the settings' data files: text that names its first non-UTF-8 byte, JSON whose
objects remember duplicate keys, and the key path of the first string that is not text.
Shared by the taboo, openup, social and redteam loaders, so every one of them answers bad
input with one line naming the file, the record and the field."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dat.errors import DatError

_SURROGATE = re.compile("[\ud800-\udfff]")


class _Object(dict):
    """A parsed JSON object that remembers the keys it had more than once (``json.loads``
    alone keeps the last copy silently)."""

    __slots__ = ("duplicates",)


def _object(pairs) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for k, v in pairs:
        if k in obj and k not in obj.duplicates:
            obj.duplicates.append(k)
        obj[k] = v
    return obj


def duplicates(obj) -> list[str]:
    """The keys a JSON object read by :func:`read_json` had more than once."""
    return list(getattr(obj, "duplicates", ()))


def read_text(path: Path) -> tuple[str, str | None]:
    """The file's text (a UTF-8 BOM dropped) and, when it is not valid UTF-8, why (its
    first bad byte); undecodable bytes are kept as lone surrogates, so the caller can name
    the record and the field that hold them (:func:`first_non_text`)."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatError(f"{path}: file is UTF-16; save it as UTF-8")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        pos = exc.start
        line = data.count(b"\n", 0, pos) + 1
        col = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
        why = (f"not valid UTF-8 (byte 0x{data[pos]:02x} at line {line}, byte {col}); "
               "save the file as UTF-8")
        return data.decode("utf-8", errors="surrogateescape"), why


def not_text(s: str) -> bool:
    """Whether ``s`` holds a lone surrogate (an undecodable byte kept by :func:`read_text`)."""
    return bool(_SURROGATE.search(s))


def shown(s: str) -> str:
    """``s`` safe to print: lone surrogates as U+FFFD."""
    return _SURROGATE.sub("\ufffd", s)


def first_non_text(doc) -> tuple | None:
    """The key path (keys and list indices, in document order) to the first key or string
    value that holds a lone surrogate; None if every string is text."""
    stack = [(doc, ())]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return where
        elif isinstance(value, dict):
            for k in value:
                if _SURROGATE.search(k):
                    return (*where, k)
            stack.extend(((v, (*where, k)) for k, v in reversed(value.items())))
        elif isinstance(value, list):
            stack.extend(((v, (*where, i)) for i, v in reversed(list(enumerate(value)))))
    return None


def read_json(path: Path, kind: str):
    """Parse the JSON file ``path`` (known to exist): ``(doc, utf8_error)``. Objects remember
    duplicate keys (:func:`duplicates`); ``utf8_error`` says why the file is not UTF-8."""
    text, utf8_error = read_text(path)
    if not text.strip():
        raise DatError(f"{path}: file is empty; expected {kind}")
    try:
        return json.loads(text, object_pairs_hook=_object), utf8_error
    except json.JSONDecodeError as exc:
        if utf8_error:
            raise DatError(f"{path}: {utf8_error}") from None
        raise DatError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                       f"{exc.msg})") from None
    except RecursionError:
        raise DatError(f"{path}: not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise DatError(f"{path}: not valid JSON: {exc}") from None


def field_path(rest: tuple) -> str:
    """``field 'name'`` (``field 'name' at [1]`` for a value nested inside it)."""
    if not rest:
        return ""
    inner = "".join(f"[{k}]" if isinstance(k, int) else f"[{shown(k)!r}]" for k in rest[1:])
    return f": field {shown(str(rest[0]))!r}" + (f" at {inner}" if inner else "")
