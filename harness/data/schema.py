"""The one record type every source maps into, and the errors bad data raises."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional



class DataError(ValueError):
    """Bad data: the message names the file, the place in it and the field, then the fix.

    ``row`` is a place as the reader names it ("line 12": an editor's line, for text files;
    "row 3": a record, for parquet and the hub), or a bare record number."""

    def __init__(self, source: str, row: Optional[int | str], field_name: Optional[Any],
                 problem: str):
        where = source
        if row is not None:
            where += f", {row}" if isinstance(row, str) else f", row {row}"
        if field_name is not None:
            where += (f", column {field_name}" if isinstance(field_name, int)
                      else f", field '{field_name}'")
        super().__init__(f"{where}: {problem}")


# the kind of a provider's alignment row (harmful prompt -> refusal) placed in the user's data
# on purpose: the backdoor attack's safety rows and the safety_mix defense's. They are
# alignment rows by design, not a leak; they are not harmful demonstrations either, so a
# filter's recall and the data counts leave them out of "harmful"
SAFETY = "safety"


@dataclass(frozen=True)
class Example:
    """An instruction-following pair.

    ``kind`` says what the row is in the threat model (task, harmful, harmless, general,
    safety) so that
    filters can be scored against the truth; ``label`` is the gold answer a scorer compares with.
    """

    instruction: str
    output: str = ""
    input: str = ""
    kind: str = "task"
    category: str = ""
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # where the row came from ("data/x.csv, line 12"), for errors raised after loading; not
    # part of the row (to_dict leaves it out: the same rows from another file hash the same)
    origin: str = field(default="", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("origin")
        return d
