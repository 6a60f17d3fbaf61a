"""A run's datasets, assembled from its config before any training: the toy world or the
configured sources, the attack's user upload, and the held sets the refusal feature R_l is
measured on. Nothing here trains or keys; the pipeline, the keys and the stages read it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Optional


from harness.data import attacks, jailbreaks
from harness.data.checks import check_overlaps, find_overlap
from harness.data.harmful import toy_alignment_harmful
from harness.data.mixing import refusal_pool
from harness.data.sampling import cap_rows
from harness.data.schema import Example
from harness.data.sources import load_source
from harness.data.toy import ToyWorld
from harness.stages import method_class

log = logging.getLogger("harness")


@dataclass
class Data:
    base_corpus: list[Example] = field(default_factory=list)
    alignment: list[Example] = field(default_factory=list)
    task_train: list[Example] = field(default_factory=list)
    task_test: list[Example] = field(default_factory=list)
    attack_pool: list[Example] = field(default_factory=list)
    eval_harmful: list[Example] = field(default_factory=list)
    user: list[Example] = field(default_factory=list)
    alignment_harmful: list[Example] = field(default_factory=list)  # alignment.harmful, if read
    # the attack's other copies of eval_harmful (the backdoor's triggered prompts), by name
    eval_variants: dict[str, list[Example]] = field(default_factory=dict)


def defense_flag(module: Optional[str], flag: str) -> bool:
    """A flag its method class declares (``needs_harmful_data``...: ``StageModule`` and
    ``PosthocMethod`` hold the defaults), by the class's path; False for no method."""
    return module is not None and bool(getattr(method_class(module), flag))


def check_disjoint(harmful: list[Example], attack: list[Example]) -> None:
    """The provider's harmful set and the user's attack pool may share prompts (both may come
    from one public set, and BeaverTails repeats a prompt with several answers): neither is
    scored, so an overlap is reported, not refused. Against the evaluation prompts it is a
    leak (``leak_pairs``)."""
    shared = find_overlap("alignment.harmful", harmful, "attack.harmful", attack)
    if shared is not None:
        log.warning("alignment.harmful shares prompts with %d of the %d attack-pool rows "
                    "(attack.harmful)", shared.n_shared, shared.n_scored)


def source_name(key: str, src) -> str:
    """A source as an error names it: its key and where it reads from."""
    return f"{key} ({'the toy world' if src.source == 'toy' else f'{src.source}:{src.path}'})"


class RunInputs:
    """Every dataset of one run (``run`` is a validated ``RunConfig``). ``harmful_rows``
    derives the provider's harmful rows from the toy world (injectable for tests)."""

    def __init__(self, run, harmful_rows: Callable[[ToyWorld], list[Example]] = toy_alignment_harmful):
        self.run = run
        self.harmful_rows = harmful_rows
        self._world: Optional[ToyWorld] = None
        self.data: Optional[Data] = None
        self._held: tuple[list[Example], list[Example]] = ([], [])  # real data: load()
        self.overlaps: list = []  # allowed overlaps (data.allow_overlap): load()

    @property
    def world(self) -> ToyWorld:
        if self._world is None:
            self._world = ToyWorld(self.run.world)
        return self._world

    def uses_world(self) -> bool:
        r = self.run
        benign = (r.attack.benign.source,) if "benign" in attacks.get(r.attack.name).uses else ()
        harmful = (r.alignment.harmful.source,) if self.reads_alignment_harmful() else ()
        return r.model.source == "tiny" or "toy" in (
            r.alignment.data.source, r.task.train.source, r.task.test.source,
            r.attack.harmful.source, r.eval.harmful.source, *benign, *harmful)

    def task_source(self, src, split: str) -> list[Example]:
        if src.source == "toy":
            return self.world.task(self.run.task.family, split)
        defaults = {"instruction": self.run.task.instruction} if self.run.task.instruction else {}
        # a task's answer is its label, unless the file holds both
        rows = load_source(src, required=("instruction", "output", "label"), defaults=defaults,
                           fill={"label": "output", "output": "label"})
        suffix = self.run.task.instruction_suffix  # a protocol's, e.g. Vaccine's GSM8K hint
        return [replace(ex, instruction=ex.instruction + suffix) for ex in rows] if suffix else rows

    def load(self) -> Data:
        """Load and check every dataset before any training, so bad data fails first."""
        r = self.run
        d = Data()
        if r.model.source == "tiny":
            d.base_corpus = self.world.base_corpus()
        d.alignment = (self.world.alignment_data() if r.alignment.data.source == "toy"
                       else load_source(r.alignment.data))[:r.alignment.size]
        if r.alignment.harmless is not None:
            d.alignment += load_source(r.alignment.harmless, required=("instruction", "output"),
                                       defaults={"kind": "harmless"})[:r.alignment.harmless_size]
        self._check_feature_sets(d.alignment)
        d.alignment = self._hold_out_feature_sets(d.alignment)
        d.task_train = self.task_source(r.task.train, "train")
        d.task_test = self.capped(self.task_source(r.task.test, "test"), r.eval.task_size,
                                  "eval.task_size")
        d.attack_pool = (self.world.attack_pool() if r.attack.harmful.source == "toy"
                         else [replace(e, kind="harmful") for e in load_source(r.attack.harmful)])
        attack = attacks.get(r.attack.name)
        d.eval_harmful = attack.eval_harmful(r.attack, self.capped(
            self.world.eval_harmful() if r.eval.harmful.source == "toy"
            else load_source(r.eval.harmful, required=("instruction",),
                             defaults={"kind": "harmful"}), r.eval.harmful_size,
            "eval.harmful_size"))
        d.eval_variants = attack.eval_variants(r.attack, d.eval_harmful)
        # the jailbreak poses the attack's prompts (the trigger stays on the request itself)
        d.eval_harmful = jailbreaks.apply(r.eval, d.eval_harmful)
        d.eval_variants = {k: jailbreaks.apply(r.eval, v) for k, v in d.eval_variants.items()}
        pools = {"task": lambda: d.task_train, "harmful": lambda: d.attack_pool,
                 "benign": self.benign_pool,
                 "disguised": lambda: self.world.attack_pool(disguised=True),  # filter_evasion
                 "safety": lambda: refusal_pool(d.alignment)}  # backdoor
        d.user = attacks.build_user(r.attack, lambda name: pools[name](), seed=r.seed)
        harmful = None
        if self.reads_alignment_harmful():
            harmful = d.alignment_harmful = self.alignment_harmful()
        elif defense_flag(r.posthoc.module, "needs_harmful_data") or \
                r.defense.filter.tau_from == "provider_harmful":  # the post-hoc's or tau's
            harmful = self.alignment_harmful()
        if harmful is not None:
            check_disjoint(harmful, d.attack_pool)
        self.overlaps = check_overlaps(self.leak_pairs(d, harmful), r.data.allow_overlap)
        self.data = d
        return d

    def capped(self, rows: list[Example], size, key: str) -> list[Example]:
        """An evaluation cap: a seeded, stratified sample (harness.data.sampling)."""
        kept, note = cap_rows(rows, size, self.run.eval.sample_seed, key)
        if note:
            log.info("data %s", note)
        return kept

    def leak_pairs(self, d: Data, harmful: Optional[list[Example]]) -> list[tuple]:
        """(trained, rows, scored, rows, fix) for every pair that must share no prompt: what
        the run trains on (or fits to) against what it scores. The alignment data inside the
        user's upload is not among them: safety-data mixing and backdoor attacks put it there
        by design."""
        r = self.run
        test = source_name("task.test", r.task.test)
        evals = source_name("eval.harmful", r.eval.harmful)
        attack = attacks.get(r.attack.name)
        upload = f"the user's upload (attack={r.attack.name}" + "".join(
            f", {source_name(k, s)}" for k, s, use in (
                ("attack.harmful", r.attack.harmful, "harmful"),
                ("attack.benign", r.attack.benign, "benign")) if use in attack.uses) + ")"
        pairs = [
            (source_name("task.train", r.task.train), d.task_train, test, d.task_test,
             "Give task.train and task.test different rows: one file split in two "
             "(task.train.split=':80%' task.test.split='80%:'), or remove the shared rows "
             "from one of the files"),
            (upload, d.user, evals, d.eval_harmful,
             "The user's finetuning rows would include the prompts HS is measured on: give "
             "eval.harmful prompts the attack pool does not hold (another file, or a split "
             "or where that separates them)"),
            (source_name("alignment.data", r.alignment.data), d.alignment, evals,
             d.eval_harmful, "The alignment data would train refusals on the prompts HS is "
             "measured on: give eval.harmful prompts the alignment data does not hold")]
        if "task" not in attack.uses:  # the task rows are checked as task.train above
            pairs.append((upload, d.user, test, d.task_test,
                          "Give task.test rows the upload does not hold"))
        if harmful is not None:
            pairs.append((source_name("alignment.harmful", r.alignment.harmful), harmful,
                          evals, d.eval_harmful,
                          "The provider's harmful set is fitted to (trained on, or used to "
                          "select weights or tau) and must not hold the evaluation prompts: "
                          "give alignment.harmful and eval.harmful different prompts"))
        return pairs

    def reads_alignment_harmful(self) -> bool:
        return defense_flag(self.run.defense.align.module, "needs_harmful_data")

    def alignment_harmful(self) -> list[Example]:
        """The provider's harmful (prompt, harmful answer) rows (alignment.harmful)."""
        r = self.run
        src = r.alignment.harmful
        rows = (self.harmful_rows(self.world) if src.source == "toy" else
                load_source(src, defaults={"kind": "harmful"}))[:r.alignment.harmful_size]
        if not rows:
            raise ValueError("alignment.harmful: no rows (alignment.harmful_size="
                             f"{r.alignment.harmful_size})")
        return rows

    def benign_pool(self) -> list[Example]:
        src = self.run.attack.benign
        if src.source == "toy":
            return self.world.benign_pool()
        return load_source(src, defaults={"kind": "harmless"})

    def _needs_refusal_feature(self) -> list[str]:
        """The config keys whose methods measure R_l from held harmful and harmless prompts."""
        r = self.run
        keys = []
        if defense_flag(r.defense.align.module, "needs_refusal_feature"):
            keys.append(f"defense.align.module={r.defense.align.module}")
        if r.defense.filter.kind == "refusal_feature":
            keys.append("defense.filter.kind=refusal_feature")
        return keys

    def _check_feature_sets(self, alignment: list[Example]) -> None:
        if self.run.alignment.data.source == "toy":
            return
        kinds = {ex.kind == "harmful" for ex in alignment}
        if kinds == {True, False}:
            return
        needs = self._needs_refusal_feature()
        missing = "harmless" if True in kinds else "harmful"
        if needs:
            raise ValueError(
                f"alignment: {' and '.join(needs)} measure the refusal feature R_l, which "
                f"contrasts harmful with harmless prompts, and the alignment data "
                f"({self.run.alignment.name}) has no {missing} rows. Add some with "
                "alignment.harmless (alignment=beavertails_alpaca adds Alpaca, as Ref-Teacher "
                "does), or a local file with a kind column")
        if self.run.eval.refusal_separation:
            log.warning("alignment data %s has no %s rows: refusal separation is skipped "
                        "(alignment.harmless adds them)", self.run.alignment.name, missing)

    def _hold_out_feature_sets(self, alignment: list[Example]) -> list[Example]:
        """Real data: the first ``eval.feature_set_size`` rows of each kind become the held
        sets R_l (and the filter's tau) are measured on, and leave the alignment training data,
        so the teacher never trains on them. Data of one kind only holds nothing out (no R_l
        can be measured on it). The toy world has held sets of its own."""
        if self.run.alignment.data.source == "toy":
            return alignment
        k = self.run.eval.feature_set_size
        harmful = [i for i, ex in enumerate(alignment) if ex.kind == "harmful"]
        harmless = [i for i, ex in enumerate(alignment) if ex.kind != "harmful"]
        if not harmful or not harmless:
            return alignment
        for name, rows in (("harmful", harmful), ("harmless", harmless)):
            if len(rows) <= k:
                raise ValueError(
                    f"eval.feature_set_size={k}: the alignment data has {len(rows)} {name} rows, "
                    f"and the first {k} are held out of training to measure the refusal "
                    f"feature; none would be left to train on. Lower eval.feature_set_size or "
                    f"add {name} rows")
        held = set(harmful[:k]) | set(harmless[:k])
        self._held = ([alignment[i] for i in harmful[:k]], [alignment[i] for i in harmless[:k]])
        return [ex for i, ex in enumerate(alignment) if i not in held]

    def feature_sets(self) -> tuple[list[Example], list[Example]]:
        """Held harmful and harmless prompts for estimating R_l, apart from training data."""
        if self.run.alignment.data.source == "toy":
            return self.world.feature_prompts()
        return self._held

    def eval_harmless(self) -> list[Example]:
        """Held-out harmless prompts for the separation analysis."""
        if self.run.eval.harmful.source == "toy":
            return self.world.eval_harmless()
        return self.data.task_test

    def over_refusal_prompts(self) -> list[Example]:
        """Harmless prompts that look dangerous (the toy world's XSTest-like held set): the share
        a model refuses is its over-refusal rate. Empty off the toy world's eval prompts."""
        if self.run.eval.harmful.source == "toy":
            return self.world.eval_scary()
        return []

    def render(self, examples: list[Example]) -> list[str]:
        return [self.run.template.render_prompt(ex) for ex in examples]
