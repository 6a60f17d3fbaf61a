"""A full disk, recognised wherever a write fails, and what to do about it.

Writers report a full disk in three ways: an ``OSError`` with errno ENOSPC (or EDQUOT, a quota),
anywhere in the exception's chain (a file object torch.save writes through raises it; the
RuntimeError above it only says the archive broke); a library's own error whose text carries
the OS's (safetensors: "No space left on device (os error 28)"); and torch.save given a path,
whose C++ writer raises ``RuntimeError: [enforce fail at inline_container.cc:...] . unexpected
pos ...`` with no errno at all. The last is recognised by its message; its usual cause is a full
disk, so the hint says so and adds what ``os.statvfs`` reports free on the run's folders.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# torch's zip writer after a short write: the stream's position is not where it wrote to
TORCH_WRITER = re.compile(r"inline_container\.cc.*(unexpected pos|file write failed)"
                          r"|PytorchStreamWriter failed writing", re.IGNORECASE | re.DOTALL)


def causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every exception it was raised from or during, each once."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def _where(path: Path) -> Path:
    """``path``, or its nearest existing parent (statvfs needs an existing path)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(paths: Iterable[str | os.PathLike]) -> list[str]:
    """"<n> MiB free at <path>" for each path's filesystem (once per filesystem)."""
    out, seen = [], set()
    for p in paths:
        where = _where(Path(p))
        try:
            st = os.statvfs(where)
        except OSError:
            continue
        if st.f_fsid in seen:
            continue
        seen.add(st.f_fsid)
        out.append(f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB free at {where}")
    return out


def full_disk_evidence(err: BaseException) -> Optional[str]:
    """How ``err`` shows a full disk ("" when it names no file), else None."""
    chain = list(causes(err))
    for e in chain:
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return f" writing {e.filename}" if e.filename else ""
    for e in chain:
        if any(text in str(e).lower() for text in FULL_TEXTS):
            return ""
    for e in chain:
        if TORCH_WRITER.search(str(e)):
            return (" (torch's file writer stopped mid-file and hides the OS error; a full disk "
                    "is its usual cause)")
    return None


def disk_full_hint(err: BaseException, paths: Iterable[str | os.PathLike] = ()
                   ) -> Optional[str]:
    """What to do about a full disk, else None. ``paths``: the folders a run writes to (the
    artifact store, the run folder), whose free space the hint reports. Nothing half-written is
    kept: stages build in a temp folder renamed into place, files are written atomically."""
    where = full_disk_evidence(err)
    if where is None:
        return None
    free = free_space(paths)
    now = f" Now: {'; '.join(free)}." if free else ""
    return (f"no space left on the disk{where}.{now} Free space where paths.artifacts and the "
            "run folder live (old artifacts/<stage>/<key> folders can go, each is rebuilt on "
            "demand, as can .corrupt-* folders set aside there), or set paths.artifacts to a "
            "larger disk, then rerun the same command: finished stages are reused and a stage "
            "in progress resumes from its last checkpoint")
