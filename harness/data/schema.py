"""The one record type every source maps into, and the errors bad data raises."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

KINDS = ("task", "harmful", "harmless", "general")


class DataError(ValueError):
    """Bad data: the message names the file, the row and the field."""

    def __init__(self, source: str, row: Optional[int], field_name: Optional[str], problem: str):
        where = source
        if row is not None:
            where += f", row {row}"
        if field_name is not None:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Example:
    """An instruction-following pair.

    ``kind`` says what the row is in the threat model (task, harmful, harmless, general) so that
    filters can be scored against the truth; ``label`` is the gold answer a scorer compares with.
    """

    instruction: str
    output: str = ""
    input: str = ""
    kind: str = "task"
    category: str = ""
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
