"""The code a stage runs, as digests of its modules' source files: part of every trained or
computed stage's key, so an edited method is rebuilt and a reverted one is served again.

A stage's code is given as two lists of dotted module names:

- ``follow``: the modules that define the stage's math (a defense or post-hoc method, the refusal
  feature, the judges, the scorers). Each is taken with the modules it imports, transitively,
  read from its import statements (nothing is imported), within ``harness`` and, for a user's
  plug-in method, within the plug-in's own top-level package.
- ``files``: the stage's runner (``training.py``, ``filtering.py``, ``editing.py``,
  ``evaluating.py``), taken alone: it wires the math to the data and the trainer, and its
  own imports (config, store, tracking) reach much of the package.

Two modules are never followed: ``harness.config.schema`` declares the config, whose values are in
every key already, and ``harness.data.toy`` generates the toy world, whose rows are in the keys as
fingerprints. Following them would rebuild every artifact on a change that cannot move a result.

The digest of a module is the sha256 of its file's bytes (not git's view of it), so an
uncommitted edit counts, and a file restored byte for byte gives the old key back. Library
versions stay out: they are recorded in each artifact's provenance instead.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Iterable

NOT_FOLLOWED = frozenset({"harness.config.schema", "harness.data.toy"})


def module_file(name: str) -> Path:
    """The source file of module ``name`` (found without importing it, when possible)."""
    path = _find(name)
    if not path.is_file():  # moved since it was found: look again
        _find.cache_clear()
        path = _find(name)
    return path


@lru_cache(maxsize=None)
def _find(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ModuleNotFoundError(f"no Python source for module {name!r}, needed for the code "
                                  "digest of a stage key")
    return Path(spec.origin)


def _version(path: Path) -> tuple[str, int, int]:
    """A file's identity for the caches below: an edit changes its mtime or size."""
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


def imported_modules(name: str) -> frozenset[str]:
    """The modules ``name`` imports (anywhere in the file) that lie in ``harness`` or in its own
    top-level package."""
    return _imports(name, *_version(module_file(name)))


@lru_cache(maxsize=None)
def _imports(name: str, path_text: str, mtime_ns: int, size: int) -> frozenset[str]:
    tops = {name.split(".")[0], "harness"}
    path = Path(path_text)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:  # "from pkg import submodule" names a module
                sub = f"{base}.{alias.name}"
                out.add(sub if _is_module(sub) else base)
    return frozenset(m for m in out if m.split(".")[0] in tops and _is_module(m))


@lru_cache(maxsize=None)
def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that is not a package
        return False


def code_modules(follow: Iterable[str], files: Iterable[str] = ()) -> list[str]:
    """The sorted module names a stage's code digest covers (see the module docstring)."""
    files = list(files)
    seen: set[str] = set(files)
    todo = [m for m in follow if m not in NOT_FOLLOWED]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [m for m in imported_modules(name) if m not in seen and m not in NOT_FOLLOWED]
    return sorted(seen)


def file_sha(name: str) -> str:
    return _sha(*_version(module_file(name)))


@lru_cache(maxsize=None)
def _sha(path_text: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path_text).read_bytes()).hexdigest()[:16]


def code_payload(follow: Iterable[str], files: Iterable[str] = ()) -> dict[str, str]:
    """{module: sha256 of its file} for every module a stage runs: kept per module, so two
    manifests side by side show which file made their keys differ."""
    return {name: file_sha(name) for name in code_modules(follow, files)}
