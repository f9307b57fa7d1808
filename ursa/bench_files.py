"""Reading benchmark records from the files people have, into one record form per benchmark.

Accepted files (the format is chosen by the extension; docs/benchmarks.md lists the columns):
  .json   a dict id -> record, or a list of records (MathVista testmini, WE-MATH, URSA's
          outputs/infer_wemath.json)
  .jsonl  one record per line (MATH-V test.jsonl, DynaMath, responses written by this project)
  .csv    a table with a header row, Excel style: quoted cells may span lines, "" escapes a quote
          (URSA-MATH's released outputs/infer_mathvista.csv and outputs/infer_mathvision.csv)
  .tsv    VLMEvalKit's tab-separated benchmark files (an `index` column, the image as base64);
          each row is mapped onto the benchmark's own record form (see vlmeval_record), so the
          same scorer applies. A .tsv without an `index` column is read as a plain table.

Every record is then normalised (normalise_record) the same way whatever the file:
  - a table cell left empty is absent (None);
  - `choices` / `options` must be a list; a string is read as a Python list literal with
    ast.literal_eval ("['135°', '140°']"); anything else is a BenchmarkError naming the record
    (a string left as is would be matched character by character);
  - `metadata` must be a dict; a string is read as a Python dict literal;
  - `precision` and `level` become integers ("1.0" -> 1, 2.0 -> 2); a non-integral value is an error.
Nothing is ever evaluated as code: ast.literal_eval reads literals only.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import math
import os
import re

from ursa.data import DataError, read_jsonl

BENCHMARKS = ("mathvista", "mathvision", "mathverse", "dynamath", "wemath", "geoqa")

# other spellings people use for the benchmarks, after lower-casing and dropping "-", "_", " "
_ALIASES = {"mathv": "mathvision", "mathvistatestmini": "mathvista", "mathversetestmini": "mathverse"}

LIST_FIELDS = ("choices", "options")
DICT_FIELDS = ("metadata",)
INT_FIELDS = ("precision", "level")

# VLMEvalKit stores an image shared by several rows once; the other rows hold that row's `index`
# (a short string) instead of the base64 data (vlmeval/dataset/image_base.py). Base64 of any real
# image is longer than this.
VLMEVAL_IMAGE_REF_MAX = 64
# cells holding a base64 image exceed the csv module's default limit of 131072 characters
CSV_FIELD_LIMIT = 2 ** 31 - 1
OPTION_COLUMNS = "ABCDEFGHIJ"


class BenchmarkError(ValueError):
    """A malformed benchmark file or record; the message names the file and the record."""


def benchmark_name(name: str) -> str:
    """The canonical benchmark name: case-insensitive, "-", "_" and spaces ignored ("MathVista",
    "WE-MATH", "MATH-V" -> "mathvista", "wemath", "mathvision"); else a BenchmarkError listing them."""
    key = re.sub(r"[-_\s]", "", str(name).lower())
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return key


# ----------------------------------------------------------------------------------------------
# field normalisation


def _literal(value: str, where: str, field: str, kind: type):
    """ast.literal_eval(value) when it gives a `kind` (list also accepts a tuple), else a BenchmarkError."""
    shown = value if len(value) <= 60 else value[:57] + "..."
    try:
        out = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        out = None
    if kind is list and isinstance(out, tuple):
        out = list(out)
    if not isinstance(out, kind):
        example = "['A', 'B']" if kind is list else "{'task': 'geometry problem solving'}"
        raise BenchmarkError(f'{where}: field "{field}" must be a {kind.__name__} (or a Python '
                             f'{kind.__name__} literal such as "{example}"), got {shown!r}')
    return out


def _as_int(value, where: str, field: str) -> int | None:
    """None / "" / NaN -> None; 1, 1.0, "1", "1.0" -> 1; anything else is a BenchmarkError."""
    if value is None:
        return None
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        try:
            value = float(s)
        except ValueError:
            raise BenchmarkError(f'{where}: field "{field}" must be an integer, got {value!r}') from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BenchmarkError(f'{where}: field "{field}" must be an integer, got {value!r}')
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if not value.is_integer():
            raise BenchmarkError(f'{where}: field "{field}" must be an integer, got {value!r}')
    return int(value)


def normalise_record(rec: dict, where: str) -> dict:
    """A copy of `rec` with list / dict / integer fields in their types (see the module docstring)."""
    out = dict(rec)
    for f in LIST_FIELDS:
        v = out.get(f)
        if isinstance(v, str):
            out[f] = _literal(v, where, f, list) if v.strip() else None
        elif isinstance(v, tuple):
            out[f] = list(v)
        elif v is not None and not isinstance(v, list):
            raise BenchmarkError(f'{where}: field "{f}" must be a list, got {type(v).__name__} {v!r}')
    for f in DICT_FIELDS:
        v = out.get(f)
        if isinstance(v, str):
            out[f] = _literal(v, where, f, dict) if v.strip() else None
        elif v is not None and not isinstance(v, dict):
            raise BenchmarkError(f'{where}: field "{f}" must be a dict, got {type(v).__name__}')
    for f in INT_FIELDS:
        if f in out:
            out[f] = _as_int(out[f], where, f)
    return out


# ----------------------------------------------------------------------------------------------
# file readers: (where, raw record) pairs


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        raise BenchmarkError(f"{path}: no such file")
    if os.path.isdir(path):
        raise BenchmarkError(f"{path}: is a folder, not a benchmark file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except OSError as e:
        raise BenchmarkError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_records(path: str, text: str) -> list[tuple[str, dict]]:
    """A .json file: a dict id -> record (`FILE: record "413"`) or a list (`FILE: record 3`)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if isinstance(data, dict):
        items = [(f'{path}: record "{k}"', r) for k, r in data.items()]
    elif isinstance(data, list):
        items = [(f"{path}: record {i}", r) for i, r in enumerate(data)]
    else:
        raise BenchmarkError(f"{path}: expected a JSON object or list of records")
    for where, rec in items:
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return items


def _jsonl_records(path: str) -> list[tuple[str, dict]]:
    """A .jsonl file through the project's one JSONL reader (ursa.data.read_jsonl): `FILE:17`."""
    try:
        recs = read_jsonl(path, allow_empty=True)
    except DataError as e:
        raise BenchmarkError(str(e)) from None
    return [(r.pop("_where"), r) for r in recs]


def _table_records(path: str, text: str, delimiter: str) -> list[tuple[str, dict]]:
    """A CSV / TSV table with a header row: each row a dict header -> cell ("" -> None), labelled
    `FILE:LINE` with the line the row starts on. A column with an empty header (the row number
    pandas writes first) is dropped."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    rows, start = [], 1
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise BenchmarkError(f"{path}:{reader.line_num}: not a valid table: {e}") from None
    rows = [(line, r) for line, r in rows if r]
    if not rows:
        return []
    header = rows[0][1]
    dup = sorted({h for h in header if h and header.count(h) > 1})
    if dup:
        raise BenchmarkError(f"{path}:1: repeated column name {dup[0]!r}")
    out = []
    for line, row in rows[1:]:
        where = f"{path}:{line}"
        if len(row) != len(header):
            raise BenchmarkError(f"{where}: {len(row)} cells, but the header has {len(header)}")
        out.append((where, {h: (c if c != "" else None) for h, c in zip(header, row) if h != ""}))
    return out


# ----------------------------------------------------------------------------------------------
# VLMEvalKit TSV rows -> the benchmark's own record form


def _options_from_columns(row: dict) -> list[str]:
    """Option texts of VLMEvalKit's MCQ columns A, B, C, ... (stops at the first empty one)."""
    out = []
    for letter in OPTION_COLUMNS:
        if row.get(letter) is None:
            break
        out.append(row[letter])
    return out


def _copy(row: dict, rec: dict, pairs: dict) -> None:
    """rec[new] = row[old] for each old -> new of `pairs` present in the row, unless rec has `new`."""
    for old, new in pairs.items():
        if row.get(old) is not None and rec.get(new) is None:
            rec[new] = row[old]


def vlmeval_record(benchmark: str, row: dict, where: str) -> dict:
    """One VLMEvalKit TSV row as the benchmark's own record (docs/benchmarks.md has the table).

    All columns are kept; these are added (an existing field of that name wins):
      every benchmark  `image_base64` <- `image` (the base64 data; `image` itself is removed so a
                       path-based loader never mistakes it for a file name; `image_path`, when
                       present, becomes `image`); `answer`, `question` as they are
      mathvista   pid <- index; choices <- choices (list literal); metadata <- task, skills,
                  category, context, grade, source, language columns (when no metadata column)
      mathvision  id <- index; options <- choices; subject <- category
      mathverse   sample_index <- index; question_type inferred when absent: "multi-choice" if the
                  answer is one letter A-J, else "free-form"
      dynamath    ground_truth <- answer; variant <- varid (qid, answer_type, subject kept)
      wemath      choices <- columns A, B, ...; option <- "A. x;B. y" (the prompt text)
      geoqa       id <- index; choices <- columns A, B, ... (or a choices list literal)
    """
    b = benchmark_name(benchmark)
    rec = {k: v for k, v in row.items() if k != "image"}
    if row.get("image") is not None:
        rec["image_base64"] = row["image"]
    if row.get("image_path") is not None:
        rec["image"] = row["image_path"]
    if b == "mathvista":
        _copy(row, rec, {"index": "pid"})
        if rec.get("metadata") is None:
            meta = {k: row[k] for k in ("task", "category", "context", "grade", "source", "language")
                    if row.get(k) is not None}
            if row.get("skills") is not None:
                meta["skills"] = _literal(row["skills"], where, "skills", list)
            rec["metadata"] = meta
    elif b == "mathvision":
        _copy(row, rec, {"index": "id", "choices": "options", "category": "subject"})
    elif b == "mathverse":
        _copy(row, rec, {"index": "sample_index"})
        if rec.get("question_type") is None:
            ans = (row.get("answer") or "").strip()
            rec["question_type"] = "multi-choice" if len(ans) == 1 and ans in OPTION_COLUMNS else "free-form"
    elif b == "dynamath":
        _copy(row, rec, {"answer": "ground_truth", "varid": "variant"})
    elif b in ("wemath", "geoqa"):
        if b == "geoqa":
            _copy(row, rec, {"index": "id"})
        opts = _options_from_columns(row)
        if opts and rec.get("choices") is None:
            rec["choices"] = opts
        if b == "wemath" and opts and rec.get("option") is None:
            rec["option"] = ";".join(f"{OPTION_COLUMNS[i]}. {o}" for i, o in enumerate(opts))
    return rec


def _resolve_image_refs(items: list[tuple[str, dict]]) -> None:
    """Replace an `image` cell holding another row's `index` by that row's image (one hop)."""
    by_index = {r.get("index"): r.get("image") for _, r in items if r.get("index") is not None}
    for where, r in items:
        img = r.get("image")
        if img is not None and len(img) <= VLMEVAL_IMAGE_REF_MAX:
            target = by_index.get(img.strip())
            if target is None or len(target) <= VLMEVAL_IMAGE_REF_MAX:
                raise BenchmarkError(f'{where}: field "image" is neither base64 image data nor the '
                                     f'index of a row holding an image: {img!r}')
            r["image"] = target


def record_image_bytes(rec: dict, where: str = "record") -> bytes | None:
    """The encoded image (PNG / JPEG bytes) a VLMEvalKit row carries in `image_base64`, or None when
    the record has none (then its image is a file: `image` / `image_path`). A list literal of several
    base64 images (multi-image items) gives the first. Decode with PIL.Image.open(io.BytesIO(b))."""
    data = rec.get("image_base64")
    if data is None:
        return None
    if isinstance(data, str) and data.lstrip().startswith("["):
        imgs = _literal(data, where, "image_base64", list)
        if not imgs:
            return None
        data = imgs[0]
    if not isinstance(data, str):
        raise BenchmarkError(f'{where}: field "image_base64" must be a base64 string, got {type(data).__name__}')
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BenchmarkError(f'{where}: field "image_base64" is not valid base64') from None


# ----------------------------------------------------------------------------------------------
# the entry point


READERS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def read_records(path: str, benchmark: str | None = None) -> list[tuple[str, dict]]:
    """Records of a benchmark file, normalised, each with its location label for error messages:
    `FILE: record "413"` (JSON dict), `FILE: record 3` (JSON list), `FILE:17` (JSONL line, or the
    line a CSV / TSV row starts on).

    benchmark: needed for a VLMEvalKit .tsv (its rows are mapped onto that benchmark's records);
    ignored otherwise. Raises BenchmarkError naming the file (and record) for a missing, unreadable
    or malformed file."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in READERS:
        raise BenchmarkError(f"{path}: unknown file type {ext or '(none)'!r}; expected .json, .jsonl, "
                             ".csv or .tsv")
    kind = READERS[ext]
    if kind == "jsonl":
        items = _jsonl_records(path)
    elif kind == "json":
        items = _json_records(path, _read_text(path))
    else:
        text = _read_text(path)
        items = _table_records(path, text, "," if kind == "csv" else "\t")
        if kind == "tsv" and items and "index" in items[0][1]:
            if benchmark is None:
                raise BenchmarkError(f"{path}: a VLMEvalKit .tsv is read for one benchmark: give its name")
            _resolve_image_refs(items)
            items = [(w, vlmeval_record(benchmark, r, w)) for w, r in items]
    return [(w, normalise_record(r, w)) for w, r in items]
