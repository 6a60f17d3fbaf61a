"""Start-up checks on a run's loaded data, before any training: no prompt it trains on is one it
scores, and a csv read without a header does not start with the header.

Rows are compared by content, not by where they came from: two sources overlap where a row of
one has the same prompt as a row of the other, whatever the files' names, split units or
directions (``prompt_digest``). The prompt is the instruction and the input, with case and
whitespace normalised. The answer is left out on purpose: a model that trained on a test
prompt has seen it whatever answer came with it (a relabelled duplicate is still a leak), and
the harmful evaluation prompts have no answers to compare.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from harness.data.schema import Example

log = logging.getLogger("harness")

OVERRIDE = "data.allow_overlap=true"


def normalise(text: str) -> str:
    """Case-folded, with every run of whitespace one space, ends stripped."""
    return " ".join(text.casefold().split())


def prompt_digest(ex: Example) -> str:
    """A digest of the row's prompt: its normalised instruction and input."""
    text = normalise(ex.instruction) + "\x1f" + normalise(ex.input)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass
class Overlap:
    """Rows of ``scored`` whose prompt is also in ``trained``."""

    trained: str  # the training source, as its config key names it
    scored: str
    n_shared: int  # rows of ``scored`` whose prompt ``trained`` holds
    n_scored: int
    examples: list[Example]  # a few of them, for the message

    def message(self) -> str:
        """The counts and a few shared rows, with the short names (the full names head the
        error's line)."""
        trained, scored = (name.split(" (")[0] for name in (self.trained, self.scored))
        where = "; ".join(f"{ex.origin or '(generated)'}: {(ex.input or ex.instruction)[:60]!r}"
                          for ex in self.examples)
        return (f"{self.n_shared} of the {self.n_scored} {scored} rows are prompts {trained} "
                f"holds (the same instruction and input, case and whitespace ignored), so the "
                f"run would score prompts it trained on; e.g. {where}")


def find_overlap(trained_name: str, trained: Iterable[Example], scored_name: str,
                 scored: list[Example], n_examples: int = 3) -> Optional[Overlap]:
    seen = {prompt_digest(ex) for ex in trained}
    shared = [ex for ex in scored if prompt_digest(ex) in seen]
    if not shared:
        return None
    return Overlap(trained_name, scored_name, len(shared), len(scored), shared[:n_examples])


class DataLeak(ValueError):
    """A run would score prompts it trained on."""


def check_overlaps(pairs: list[tuple[str, list[Example], str, list[Example], str]],
                   allow: bool) -> list[Overlap]:
    """Each (trained name, rows, scored name, rows, how to fix) pair must share no prompt:
    raise DataLeak naming every pair that does, or with ``allow`` warn and return them."""
    found = []
    for trained_name, trained, scored_name, scored, fix in pairs:
        overlap = find_overlap(trained_name, trained, scored_name, scored)
        if overlap is not None:
            found.append((overlap, fix))
    if not found:
        return []
    if allow:
        for overlap, _ in found:
            log.warning("data leak allowed (data.allow_overlap=true): %s -> %s: %s",
                        overlap.trained, overlap.scored, overlap.message())
        return [o for o, _ in found]
    raise DataLeak("\n".join(f"{o.trained} -> {o.scored}: {o.message()}. {fix}"
                             for o, fix in found)
                   + f"\n(a study that means to score trained prompts sets {OVERRIDE})")


# column names that data sets put on their first line: a row holding one of them, read from
# a file with header: false, is the header read as data
KNOWN_COLUMNS = frozenset(
    "prompt instruction input output label text sentence goal target behavior behaviour "
    "category question answer response query description title class index id source context "
    "functionalcategory semanticcategory behaviorid contextstring tags is_safe kind "
    "request completion response_0 response_1".split())


def header_as_data(first: dict[Any, Any], columns: Iterable[Any]) -> list[str]:
    """The values in ``columns`` of a header-less file's first row that are column names (a
    known one, or our own field names)."""
    out = []
    for column in columns:
        value = first.get(column)
        if isinstance(value, str) and value.strip().casefold().replace(" ", "") in KNOWN_COLUMNS:
            out.append(value.strip())
    return out
