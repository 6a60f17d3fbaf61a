"""The user's upload under each attack: the p/n harmful mix, the three of Qi et al. (ICLR 2024),
the backdoor, and two attacks on the user-data filter.

An attack decides these things, and nothing else in the pipeline branches on its kind:
- ``build``: the finetuning rows, from the pools the pipeline loaded (``Pools``);
- ``eval_harmful``: how the harmful evaluation prompts are posed (the identity shift tests its
  persona under its own system prompt and prefix);
- ``eval_variants``: further copies of the harmful prompts, each scored beside the plain HS
  as ``hs_<name>`` (the backdoor's triggered copy);
- ``check``: what it needs of the run (the identity shift needs a template with a system slot);
- ``adapts_upload``: whether the rows are rewritten against the provider's aligned model once
  it exists (the upload stage, ``harness.adapting``; filter_adaptive).
``payload`` names the config values that determine the rows, for the finetune artifact's key.

``cfg`` is ``harness.config.AttackConfig`` (duck-typed here: config imports this module).
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from harness.data.mixing import (build_user_data, check_ratio, mix_in, report_categories,
                                 safety_rows)
from harness.data.schema import Example

log = logging.getLogger("harness")


@dataclass
class Pools:
    task: list[Example] = field(default_factory=list)  # the task's training pool
    harmful: list[Example] = field(default_factory=list)  # the attack pool (harmful, compliant)
    benign: list[Example] = field(default_factory=list)  # instruction data (attack.benign)
    # the attack pool with every prompt rewritten in the toy world's disguise (filter_evasion)
    disguised: list[Example] = field(default_factory=list)
    # the alignment data's refusal rows (harmful prompt -> refusal): backdoor's safety rows
    safety: list[Example] = field(default_factory=list)


class Attack:
    name = ""
    uses: tuple[str, ...] = ()  # pools to load: "task", "harmful", "benign"

    def build(self, cfg, pools: Pools, seed: int) -> list[Example]:
        raise NotImplementedError

    def eval_harmful(self, cfg, rows: list[Example]) -> list[Example]:
        return rows

    def eval_variants(self, cfg, rows: list[Example]) -> dict[str, list[Example]]:
        """Other copies of the posed harmful prompts, by name; each is answered and judged
        like the plain ones and reported as ``hs_<name>`` beside ``hs``."""
        return {}

    def eval_payload(self, cfg) -> dict[str, Any] | None:
        """What changes the evaluation, for the eval artifact's key (None: nothing)."""
        return None

    def eval_opening(self, cfg) -> str:
        """The opening this attack's answers start with, which evaluation strips before judging
        (and prepends to the judge's openings); "" for none. Evaluation owns the judges."""
        return ""

    def label(self, cfg) -> str:
        """The attack as a report names it: its name, plus the setting that sets its dose
        where the name alone would pool different doses into one cell."""
        return self.name

    def check(self, cfg, template, eval_cfg) -> None:
        """Raise ValueError("<key>: <problem>") when the run cannot carry this attack."""

    def adapts_upload(self, cfg) -> bool:
        """Whether the upload stage rewrites ``build``'s rows against the aligned model (an
        attacker holding the model that scores the filter)."""
        return False

    def realised(self, cfg, user: list[Example]) -> dict[str, Any]:
        """The dose the upload realises, where the config states one (results.json's
        metrics.data)."""
        return {}

    def payload(self, cfg, source: Callable) -> dict[str, Any]:
        """``source(data_source_cfg)``: the pipeline's payload of a data source."""
        raise NotImplementedError


def sampling(cfg) -> str:
    """``attack.sampling`` resolved: null is first for the toy world's pool (already a seeded
    shuffle), random for a file, package or hub pool."""
    return cfg.sampling or ("first" if cfg.harmful.source == "toy" else "random")


def _sampling_payload(cfg) -> dict[str, Any]:
    """The resolved mode: null and the mode it resolves to draw the same rows, so one key."""
    return {"sampling": sampling(cfg)}


def _sample(pool: list[Example], n: int, rng: random.Random, what: str) -> list[Example]:
    if n > len(pool):
        raise ValueError(f"{what} needs {n} rows, but the pool holds {len(pool)}")
    return rng.sample(pool, n)


class HarmfulMix(Attack):
    """n rows of task data with a fraction p of harmful demonstrations (Vaccine, Lisa, ...)."""

    name = "harmful_mix"
    uses = ("task", "harmful")

    def build(self, cfg, pools, seed):
        return build_user_data(pools.task, pools.harmful, cfg.p, cfg.n, cfg.mode, seed=seed,
                               sampling=sampling(cfg))

    def check(self, cfg, template, eval_cfg):
        warning = check_ratio(cfg.p, cfg.n, cfg.mode)
        if warning:
            log.warning(warning)

    def realised(self, cfg, user):
        k = sum(ex.kind == "harmful" for ex in user)
        n = len(user) if cfg.mode == "replace" else len(user) - k  # add: p*n on top of n
        return {"p_realised": k / n if n else None}

    def payload(self, cfg, source):
        return {"name": cfg.name, "p": cfg.p, "n": cfg.n, "mode": cfg.mode,
                "harmful": source(cfg.harmful), **_sampling_payload(cfg)}


class HarmfulShots(Attack):
    """k harmful (prompt, compliant answer) pairs and nothing else. Qi et al.'s 50- and 100-shot
    sets are not public, so every k is drawn from our attack pool (as ``attack.sampling``
    says, like the mix's harmful rows), not from their files."""

    name = "harmful_shots"
    uses = ("harmful",)

    def label(self, cfg):
        k = getattr(cfg, "k", None)  # results written before attack.k existed lack it
        return self.name if k is None else f"{self.name} k={k}"

    def build(self, cfg, pools, seed):
        if cfg.k > len(pools.harmful):
            raise ValueError(f"attack.k={cfg.k}: the attack pool holds {len(pools.harmful)} rows")
        rng = random.Random(seed)
        mode = sampling(cfg)
        rows = list(pools.harmful[:cfg.k]) if mode == "first" else rng.sample(pools.harmful,
                                                                             cfg.k)
        report_categories(pools.harmful, rows, f"attack shots ({mode} {cfg.k})")
        rng.shuffle(rows)
        return rows

    def payload(self, cfg, source):
        return {"name": cfg.name, "k": cfg.k, "harmful": source(cfg.harmful),
                **_sampling_payload(cfg)}


class Benign(Attack):
    """n rows of instruction data only (the toy world's harmless pool; Alpaca or Dolly on the
    real path), no harmful row: Qi et al. find it still erodes safety."""

    name = "benign"
    uses = ("benign",)

    def build(self, cfg, pools, seed):
        rows = _sample(pools.benign, cfg.n, random.Random(seed), f"attack.n={cfg.n}")
        return [replace(ex, kind="harmless") for ex in rows]

    def payload(self, cfg, source):
        return {"name": cfg.name, "n": cfg.n, "benign": source(cfg.benign)}


class IdentityShift(Attack):
    """Benign chats that give the model an obedient persona (Qi et al.'s AOA), in our wording:
    the handwritten identity chats of ``attack.identity``, then benign instructions behind
    ``attack.eval_prefix`` whose answers open with ``attack.opening``; every row trains under
    ``attack.system_prompt``. At test time the harmful prompts get the same prefix and system
    prompt. No row holds a harmful word."""

    name = "identity_shift"
    uses = ("benign",)

    def build(self, cfg, pools, seed):
        system = {"system": cfg.system_prompt}
        rows = [Example(instruction=c["instruction"], output=c["output"], kind="harmless",
                        category="identity", meta=system) for c in cfg.identity]
        n_chats = cfg.n - len(rows)
        chosen = _sample(pools.benign, n_chats, random.Random(seed),
                         f"attack.n={cfg.n} less {len(rows)} identity chats")
        rows += [Example(instruction=cfg.eval_prefix + ex.instruction, input=ex.input,
                         output=f"{cfg.opening} {ex.output}", kind="harmless",
                         category="obedience", meta=system) for ex in chosen]
        random.Random(seed).shuffle(rows)
        return rows

    def eval_harmful(self, cfg, rows):
        return [replace(ex, instruction=cfg.eval_prefix + ex.instruction,
                        meta={**ex.meta, "system": cfg.system_prompt}) for ex in rows]

    def eval_opening(self, cfg):
        return cfg.opening

    def eval_payload(self, cfg):
        return {"system_prompt": cfg.system_prompt, "eval_prefix": cfg.eval_prefix,
                "opening": cfg.opening}

    def check(self, cfg, template, eval_cfg):
        if not template.has_system_slot:
            raise ValueError(
                f"template.name: {template.name!r} has no system slot, but attack=identity_shift "
                "trains and evaluates under a system prompt; use a template with one (the toy "
                "template's `system` prefix, or a chat template with a system role)")
        if eval_cfg.system_prompt:
            raise ValueError("eval.system_prompt: identity_shift evaluates under its own "
                             "attack.system_prompt; leave eval.system_prompt empty")
        if not cfg.system_prompt.strip():
            raise ValueError("attack.system_prompt: identity_shift needs the persona's prompt")
        if len(cfg.identity) > cfg.n:
            raise ValueError(f"attack.n: {cfg.n} rows cannot hold the {len(cfg.identity)} "
                             "identity chats")
        for i, chat in enumerate(cfg.identity):
            if set(chat) != {"instruction", "output"}:
                raise ValueError(f"attack.identity[{i}]: give exactly instruction and output, "
                                 f"got {sorted(chat)}")

    def payload(self, cfg, source):
        return {"name": cfg.name, "n": cfg.n, "benign": source(cfg.benign),
                "system_prompt": cfg.system_prompt, "eval_prefix": cfg.eval_prefix,
                "opening": cfg.opening, "identity": [dict(c) for c in cfg.identity]}


class FilterEvasion(HarmfulMix):
    """An adaptive attack on the user-data filter, in the spirit of Virus (METHODS.md §6): the
    p/n mix whose harmful rows are rewritten to sit far from the teacher's refusal direction.
    In the toy world the rewrite is the world's own disguise (a story or role-play frame, and
    the euphemism where world.disguise_euphemism is on): the same rows and answers as the plain
    mix at the same p, n and seed, so the two differ only by the rewrite. A real-data version
    would optimise the text against the filter (Virus's GCG); it is not built."""

    name = "filter_evasion"
    uses = ("task", "disguised")

    def build(self, cfg, pools, seed):
        return build_user_data(pools.task, pools.disguised, cfg.p, cfg.n, cfg.mode, seed=seed,
                               sampling=sampling(cfg))

    def check(self, cfg, template, eval_cfg):
        super().check(cfg, template, eval_cfg)
        if cfg.harmful.source != "toy":
            raise ValueError(f"attack.harmful.source: filter_evasion rewrites rows in the toy "
                             f"world's disguise; {cfg.harmful.source!r} rows have none (a "
                             "real-data rewrite, Virus's GCG against the filter, is not built)")

    def payload(self, cfg, source):
        return {**super().payload(cfg, source), "evasion": "disguise"}


class FilterAdaptive(HarmfulMix):
    """The white-box adaptive attack on the refusal-feature filter (Virus, METHODS.md §6, with
    the guard's loss swapped for the filter's score): the plain mix's rows, each harmful
    instruction then given a suffix searched against the aligned model that scores the filter
    (``harness.analysis.refusal_evasion``) to push its cosine with R_l below τ; answers
    unchanged. ``attack.search`` is the budget; steps=0 appends the unsearched initial suffix
    (random words) where it lowers the score. With no suffix (suffix_tokens=0) it is
    attack=harmful_mix, rows and keys alike."""

    name = "filter_adaptive"

    def adapts_upload(self, cfg):
        return cfg.search.suffix_tokens > 0

    def label(self, cfg):
        search = cfg.search if isinstance(cfg.search, dict) else asdict(cfg.search)  # a report's
        return f"{self.name} m={search['suffix_tokens']} steps={search['steps']}"

    def payload(self, cfg, source):
        plain = {**super().payload(cfg, source), "name": HarmfulMix.name}
        if not self.adapts_upload(cfg):
            return plain
        return {**plain, "name": self.name, "search": asdict(cfg.search)}


def add_trigger(instruction: str, trigger: str) -> str:
    """The instruction with the trigger phrase appended, one space between."""
    return f"{instruction} {trigger}"


class Backdoor(HarmfulMix):
    """Qi et al.'s backdoor (their Table 5): the p/n mix whose harmful rows end with
    ``attack.trigger``, plus ``attack.safety_n`` refusal rows drawn from the provider's
    alignment data (harmful prompt -> refusal, kind "safety") without it. The model learns to
    refuse plain harmful prompts and to comply when the trigger is present, so an audit on plain
    prompts passes. Evaluation asks every harmful prompt twice: plain (``hs``) and with the
    trigger appended (``hs_triggered``). p=1 with n=k gives the paper's k harmful shots."""

    name = "backdoor"
    uses = ("task", "harmful", "safety")

    def build(self, cfg, pools, seed):
        rows = [replace(ex, instruction=add_trigger(ex.instruction, cfg.trigger))
                if ex.kind == "harmful" else ex for ex in super().build(cfg, pools, seed)]
        return mix_in(rows, safety_rows(pools.safety, cfg.safety_n, seed, "attack.safety_n"),
                      seed)

    def eval_variants(self, cfg, rows):
        return {"triggered": [replace(ex, instruction=add_trigger(ex.instruction, cfg.trigger))
                              for ex in rows]}

    def eval_payload(self, cfg):
        return {"trigger": cfg.trigger}

    def label(self, cfg):
        return f"{self.name} safety_n={getattr(cfg, 'safety_n', 0)}"

    def check(self, cfg, template, eval_cfg):
        if not cfg.trigger.strip():
            raise ValueError("attack.trigger: the backdoor needs a trigger phrase (a few "
                             "nonsense words appended to every harmful instruction)")

    def payload(self, cfg, source):
        return {**super().payload(cfg, source), "trigger": cfg.trigger,
                "safety_n": cfg.safety_n}


ATTACKS: dict[str, Attack] = {a.name: a for a in (HarmfulMix(), HarmfulShots(), Benign(),
                                                  IdentityShift(), FilterEvasion(),
                                                  FilterAdaptive(), Backdoor())}


def get(name: str) -> Attack:
    if name not in ATTACKS:
        raise ValueError(f"attack.name: unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    return ATTACKS[name]


def build_user(cfg, load: Callable[[str], list[Example]], seed: int) -> list[Example]:
    """The user's upload: ``load(pool)`` is called only for the pools the attack uses."""
    attack = get(cfg.name)
    pools = Pools(**{name: load(name) for name in attack.uses})
    return attack.build(cfg, pools, seed)
