"""Task scorers (FA). The match mode is config, because the anchors disagree on it."""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_number(text: str, answer_phrase: str) -> str | None:
    """The first number after the answer phrase, else the last number in the text."""
    text = text.replace(",", "")
    idx = text.find(answer_phrase) if answer_phrase else -1
    if idx >= 0:
        found = _NUMBER.search(text[idx + len(answer_phrase):])
        if found:
            return found.group()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def is_correct(answer: str, label: str, cfg) -> bool:
    """One answer against its gold label, under the protocol's mode (cfg: ScorerConfig)."""
    fold = (lambda s: s) if cfg.case_sensitive else str.lower
    accepted = [label, *cfg.aliases.get(label, ())]
    if cfg.mode == "exact":
        return any(fold(answer.strip()) == fold(a.strip()) for a in accepted)
    if cfg.mode == "substring":
        return any(fold(a.strip()) in fold(answer) for a in accepted)
    if cfg.mode == "regex":
        pattern = cfg.patterns.get(label, re.escape(label))
        flags = 0 if cfg.case_sensitive else re.IGNORECASE
        return re.search(pattern, answer, flags) is not None
    if cfg.mode == "number":
        got = extract_number(answer, cfg.answer_phrase)
        return got is not None and float(got) == float(label.replace(",", ""))
    raise ValueError(f"task.scorer.mode: unknown mode {cfg.mode!r}")


def accuracy(answers: list[str], labels: list[str], cfg) -> float:
    if not answers:
        return 0.0
    return 100.0 * sum(is_correct(a, lab, cfg) for a, lab in zip(answers, labels)) / len(answers)
