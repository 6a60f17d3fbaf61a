"""The judges, registered once: how each is built, which top-level config node holds its typed
settings, and which of those settings cannot change a verdict (left out of the eval key).

Adding a judge: its module under ``harness/evaluation/``, one YAML in ``conf/judge``, one entry
here (validation checks ``judge.name`` against these). A judge with settings of its own names
their top-level node in its entry; the node's typed dataclass sits with the others in
``harness/config/schema.py`` (the schema imports nothing from the package). Everything else
follows from the entry: ``build_judge`` hands the judge its node, and the filter and eval keys
read it (less ``unkeyed``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from harness.evaluation.judges import Judge, KeywordJudge, ToyJudge


def _moderation(name: str) -> Callable:
    def build(cfg, settings) -> Judge:
        from harness.evaluation.moderation import build_moderation_judge

        return build_moderation_judge(name, settings)
    return build


def _llm_rubric(cfg, settings) -> Judge:
    from harness.evaluation.llm_judge import LLMRubricJudge

    return LLMRubricJudge(settings)


@dataclass(frozen=True)
class JudgeEntry:
    build: Callable[[Any, Any], Judge]  # (the judge node, its settings node or None)
    settings: Optional[str] = None  # the RunConfig node with its settings
    unkeyed: tuple[str, ...] = ()  # settings that cannot change a verdict
    # the setting that names a model the judge loads (hub id or folder), checked at start-up
    model: Optional[str] = None

    def model_key(self) -> Optional[str]:
        return f"{self.settings}.{self.model}" if self.settings and self.model else None

    def settings_in(self, run):
        """This judge's typed settings node of ``run`` (None for a judge without one)."""
        return getattr(run, self.settings) if self.settings else None

    def key_fields(self, settings) -> dict[str, Any]:
        return {k: v for k, v in asdict(settings).items() if k not in self.unkeyed}


_MODERATION = dict(settings="moderation", unkeyed=("batch_size",), model="model")
JUDGES: dict[str, JudgeEntry] = {
    "toy": JudgeEntry(lambda cfg, _: ToyJudge()),
    "keyword": JudgeEntry(lambda cfg, _: KeywordJudge(cfg.refusal_phrases)),
    "llm_rubric": JudgeEntry(_llm_rubric, "llm_judge",
                             ("api_key_env", "cache_dir", "timeout_s", "retries", "backoff_s")),
    "beaver_dam": JudgeEntry(_moderation("beaver_dam"), **_MODERATION),
    "llama_guard": JudgeEntry(_moderation("llama_guard"), **_MODERATION),
}


def entry(name: str) -> JudgeEntry:
    if name not in JUDGES:
        raise ValueError(f"judge.name: unknown judge {name!r} (one of {sorted(JUDGES)})")
    return JUDGES[name]


def settings_nodes() -> tuple[str, ...]:
    """Every top-level node that holds some judge's settings (what a judge's key may read)."""
    return tuple(sorted({e.settings for e in JUDGES.values() if e.settings}))


def build_judge(run, judge=None) -> Judge:
    """The judge node ``judge`` (by default the run's own, ``run.judge``), built with its
    settings node of ``run``."""
    judge = run.judge if judge is None else judge
    e = entry(judge.name)
    return e.build(judge, e.settings_in(run))


def needed_judges(run) -> dict[str, str]:
    """Every plain judge a run will build, each with the config key that asks for it: the run's
    judge and a panel's (``eval.judges``; ``hs_plus`` runs on the run's judge) when any stage is
    evaluated, and the filter's judge when ``defense.filter.kind=judge``."""
    needed: dict[str, str] = {}
    if run.eval.stages:
        needed[run.judge.name] = "judge.name"
        for name in run.eval.judges:
            plain = run.judge.name if name == "hs_plus" else name.removeprefix("hs_plus:")
            needed.setdefault(plain, "eval.judges")
    f = run.defense.filter
    if f.kind == "judge":
        needed.setdefault(f.judge or run.judge.name,
                          "defense.filter.judge" if f.judge else "judge.name")
    return needed
