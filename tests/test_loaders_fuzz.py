"""Property-based tests of the three data loaders (``load_taboo``, ``load_sotopia``,
``load_behaviors``): random mutations of valid files -- byte flips, insertions, deletions,
truncation, deleted/duplicated fields, wrong types, random unicode, other encodings -- give
either a loaded result or a :class:`~dat.errors.DatError`, never another exception.

Each test reports how many cases it tried (run with ``-s`` to see the line, or
``--hypothesis-show-statistics``). ``DAT_FUZZ_EXAMPLES=5000`` runs more cases (random
seeds then; the default run is derandomized so it is reproducible)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):  # no .hypothesis/ in the checkout
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "dat-hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dat.envs.redteam import load_behaviors
from dat.envs.social import FILES, load_sotopia
from dat.envs.taboo import load_taboo
from dat.errors import DatError

DATA = Path(__file__).parent / "data"
EXAMPLES = int(os.environ.get("DAT_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="DAT_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TABOO = {"scenarios": [
    {"id": "tea", "topic": "tea", "description": "Drinking tea.", "taboo": ["tea", "cup"]},
    {"id": "kites", "topic": "kites", "description": "Flying kites.", "taboo": ["kite"],
     "split": "test", "category": "hobby"},
]}

# ---------------------------------------------------------------------- mutations
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=6)
weird_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """A few byte-level edits: flip, insert, delete, duplicate a slice, truncate."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate",
                                   "unicode"]))
        n = len(data)
        i = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and n:
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "duplicate" and n:
            data[i:i] = data[i:i + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[i:]
        elif op == "unicode":
            data[i:i] = draw(weird_text).encode("utf-8", "surrogatepass")
    return bytes(data)


def _mutate_json(draw, doc):
    """Structural edits of a parsed JSON document: delete/duplicate/retype/add a field."""
    containers = []

    def walk(v):
        if isinstance(v, (dict, list)):
            containers.append(v)
            for x in (v.values() if isinstance(v, dict) else v):
                walk(x)

    walk(doc)
    for _ in range(draw(st.integers(1, 3))):
        c = draw(st.sampled_from(containers))
        keys = list(c) if isinstance(c, dict) else list(range(len(c)))
        op = draw(st.sampled_from(["delete", "retype", "add", "duplicate", "text"]))
        if not keys:
            op = "add"
        k = draw(st.sampled_from(keys)) if keys else None
        if op == "delete":
            del c[k]
        elif op == "retype":
            c[k] = draw(json_values)
        elif op == "text":
            c[k] = draw(weird_text)
        elif op == "add":
            if isinstance(c, dict):
                c[draw(weird_text)] = draw(json_values)
            else:
                c.append(draw(json_values))
        elif op == "duplicate" and isinstance(c, list):
            c.append(json.loads(json.dumps(c[k])))
        elif op == "duplicate":
            c[str(k) + draw(st.sampled_from(["", " ", "_2"]))] = json.loads(json.dumps(c[k]))
    return doc


def _encode(draw, text: str) -> bytes:
    enc = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return text.encode(enc, errors="surrogatepass" if enc.startswith("utf") else "replace")


@st.composite
def mutated_json(draw, doc) -> bytes:
    kind = draw(st.sampled_from(["bytes", "structure", "both", "duplicate_key"]))
    indent = draw(st.sampled_from([None, 2]))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()), indent=indent)
    if kind in ("structure", "both"):
        text = json.dumps(_mutate_json(draw, json.loads(text)), ensure_ascii=draw(st.booleans()))
    elif kind == "duplicate_key":  # a key written twice, which json.dumps cannot produce
        i = text.find('"', draw(st.integers(0, max(len(text) - 1, 0))))
        j = text.find('":', i + 1) if i >= 0 else -1
        if j > 0:
            key = text[i:j + 2]
            text = text[:i] + key + " 1, " + text[i:]
    data = _encode(draw, text)
    if kind in ("bytes", "both"):
        data = draw(byte_mutations(data))
    return data


@st.composite
def mutated_csv(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["bytes", "cells", "both"]))
    if kind in ("cells", "both"):
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
        for _ in range(draw(st.integers(1, 4))):
            r = draw(st.integers(0, len(rows) - 1))
            op = draw(st.sampled_from(["text", "delete", "duplicate", "dup_row", "drop_row",
                                       "long"]))
            row = rows[r]
            c = draw(st.integers(0, max(len(row) - 1, 0)))
            if op == "text" and row:
                row[c] = draw(weird_text)
            elif op == "delete" and row:
                del row[c]
            elif op == "duplicate" and row:
                row.insert(c, row[c])
            elif op == "dup_row":
                rows.insert(r, list(row))
            elif op == "drop_row" and len(rows) > 1:
                del rows[r]
            elif op == "long" and row:
                size = draw(st.sampled_from([20_001, 140_000]))  # over the Behavior / field limits
                row[c] = ((row[c] or "x") * size)[:size]
        out = io.StringIO(newline="")
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
        csv.writer(out, quoting=quoting).writerows(rows)
        data = _encode(draw, out.getvalue())
    if kind in ("bytes", "both"):
        data = draw(byte_mutations(data))
    return data


# ---------------------------------------------------------------------- properties
def _check(counts: dict, load) -> None:
    counts["tried"] += 1
    try:
        load()
    except DatError as exc:
        counts["error"] += 1
        msg = str(exc)
        assert msg and "\n" not in msg, msg  # one line
        msg.encode("utf-8")  # printable (no lone surrogates)
    else:
        counts["loaded"] += 1


def _report(name: str, counts: dict) -> None:
    print(f"\nfuzz {name}: {counts['tried']} cases ({counts['loaded']} loaded, "
          f"{counts['error']} DatError)")
    assert counts["tried"] >= min(EXAMPLES, 50)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_fuzz_load_taboo(workdir):
    counts = {"tried": 0, "loaded": 0, "error": 0}
    path = workdir / "taboo.json"

    @FUZZ
    @given(mutated_json(TABOO))
    def run(data):
        path.write_bytes(data)
        _check(counts, lambda: load_taboo(path))

    run()
    _report("load_taboo", counts)


def test_fuzz_load_sotopia(workdir):
    counts = {"tried": 0, "loaded": 0, "error": 0}
    folder = workdir / "sotopia"
    originals = {f: json.loads((DATA / "sotopia" / f).read_text()) for f in FILES}

    @FUZZ
    @given(st.sampled_from(FILES), st.data())
    def run(file, data):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(DATA / "sotopia", folder)
        (folder / file).write_bytes(data.draw(mutated_json(originals[file])))
        _check(counts, lambda: load_sotopia(folder))

    run()
    _report("load_sotopia", counts)


@pytest.mark.parametrize("source", ["behaviors_benign.csv", "behaviors_contextual.csv"])
def test_fuzz_load_behaviors(workdir, source):
    counts = {"tried": 0, "loaded": 0, "error": 0}
    path = workdir / "behaviors.csv"
    original = (DATA / source).read_bytes()

    @FUZZ
    @given(mutated_csv(original), st.sampled_from(["skip", "include", "error"]))
    def run(data, contextual):
        path.write_bytes(data)
        _check(counts, lambda: load_behaviors(path, contextual=contextual))

    run()
    _report(f"load_behaviors ({source})", counts)
