"""The study's table from its runs' results.json files: per run, the attack and its budget, the
harmful rows' filter scores before and after (metrics.attack), the filter's recall with its
Wilson interval (from its counts), HS and FA with theirs (metrics.final), HS less the same
defense's and p's unattacked run (no suffix) on the same prompts (a paired bootstrap over
prompts: one seed, so training noise is not in it), and the stage times. A second table splits
each run's harmful answers between the evaluation prompts in the world's disguise frame and the
plain ones. With ``--suffixes DIR`` it also writes each adaptive run's suffixes, with their
rows' objective before and after, from its upload artifact (``paths.artifacts``).

    python experiments/toy_filter_adaptive/table.py multirun/toy_filter_adaptive \
        --suffixes experiments/toy_filter_adaptive > experiments/toy_filter_adaptive/table.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from harness.config.schema import RunConfig
from harness.data.assemble import RunInputs
from harness.stats import paired_difference, prompt_interval, unpack
from harness.validation import validate


def budget(res: dict) -> str:
    attack = res["config"]["attack"]
    if attack["name"] != "filter_adaptive":
        return attack["name"]
    s = attack["search"]
    if s["suffix_tokens"] == 0:
        return "filter_adaptive, no suffix (= harmful_mix)"
    return (f"filter_adaptive m={s['suffix_tokens']} steps={s['steps']} top_k={s['top_k']} "
            f"B={s['candidates']}")


def pct(value, interval) -> str:
    return f"{value:.1f} [{interval[0]:.1f}, {interval[1]:.1f}]"


def unattacked(res: dict) -> bool:
    attack = res["config"]["attack"]
    return attack["name"] == "harmful_mix" or (attack["name"] == "filter_adaptive"
                                               and attack["search"]["suffix_tokens"] == 0)


def hs_less(res: dict, reference: dict | None) -> str:
    if reference is None or reference is res:
        return "—"
    a, b = (r["metrics"]["final"]["outcomes"] for r in (res, reference))
    if a["hs_prompts"] != b["hs_prompts"]:
        raise ValueError("the two runs scored different harmful prompts")
    d = paired_difference([unpack(a["hs"])], [unpack(b["hs"])])
    return f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}]"


def row(res: dict, reference: dict | None) -> list[str]:
    m = res["metrics"]
    f, final, attack = m["filter"], m["final"], m.get("attack") or {}
    caught = round(f["recall"] * f["n_harmful_in"])
    recall = pct(100 * f["recall"], prompt_interval(caught, f["n_harmful_in"]))
    cos = (f"{attack['cos_before_mean']:.3f} → {attack['cos_after_mean']:.3f}"
           if attack else "—")
    below = (f"{100 * attack['below_tau_before']:.0f} → {100 * attack['below_tau_after']:.0f}"
             if attack else "—")
    t = res["timings"]
    upload = f"{t['upload']['seconds']:.0f}" if "upload" in t else "—"
    return [res["config"]["defense"]["name"], str(res["config"]["attack"]["p"]), budget(res),
            cos, below,
            f"{f['threshold']:.3f}", recall, pct(final["hs"], final["interval"]["hs"]),
            hs_less(res, reference), pct(final["fa"], final["interval"]["fa"]),
            f"{final['other_rate']:.1f}",
            upload, f"{t['total']:.0f}", res["git"]]


HEAD = ["defense", "p", "attack (budget)", "mean filter score of the harmful rows, before → after",
        "harmful rows at or below τ (%), before → after", "τ", "filter recall (%) [95% Wilson]",
        "HS (%) [95% Wilson]", "HS − no suffix (pp) [95% paired bootstrap]",
        "FA (%) [95% Wilson]", "other (%)", "upload stage (s)",
        "run (s)", "commit"]


def disguised_flags(res: dict) -> list[bool]:
    """Per harmful evaluation prompt, in the order of the run's outcomes: in the disguise frame?"""
    run = validate(OmegaConf.merge(OmegaConf.structured(RunConfig), res["config"]))
    return [bool(ex.meta.get("disguised")) for ex in RunInputs(run).load().eval_harmful]


def by_prompt_kind(runs: list[dict]) -> None:
    flags = disguised_flags(runs[0])
    n_dis = sum(flags)
    print(f"\n| defense | p | attack (budget) | harmful answers, disguised prompts (of {n_dis}) "
          f"| harmful answers, plain prompts (of {len(flags) - n_dis}) |")
    print("|---|---|---|---|---|")
    for res in runs:
        hs = unpack(res["metrics"]["final"]["outcomes"]["hs"])
        if len(hs) != len(flags):
            raise ValueError("the runs scored different harmful prompts")
        dis = sum(int(o) for o, f in zip(hs, flags) if f)
        plain = sum(int(o) for o, f in zip(hs, flags) if not f)
        print(f"| {res['config']['defense']['name']} | {res['config']['attack']['p']} "
              f"| {budget(res)} | {dis} | {plain} |")


def write_suffixes(runs: list[dict], out: Path) -> None:
    for res in runs:
        art = res["artifacts"].get("upload")
        if art is None:
            continue
        saved = json.loads((Path(art["path"]) / "upload.json").read_text())
        s = res["config"]["attack"]["search"]
        name = (f"suffixes_{res['config']['defense']['name']}_p{res['config']['attack']['p']}"
                f"_m{s['suffix_tokens']}_steps{s['steps']}.json")
        rows = [{k: r[k] for k in ("index", "suffix", "plain", "initial", "best")}
                for r in saved["rows"]]
        (out / name).write_text(json.dumps({"upload_key": art["key"], "budget": saved["search"],
                                            "rows": rows}, indent=1) + "\n")


def main(root: str, suffixes: str | None) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(Path(root).rglob("results.json"))]
    runs = [r for r in runs if r.get("status") == "ok"]
    def order(res):  # by defense and p, the adaptive budgets in increasing order, then the rest
        a = res["config"]["attack"]
        return (res["config"]["defense"]["name"], a["p"], a["name"] != "filter_adaptive",
                a["search"]["suffix_tokens"], a["search"]["steps"])
    runs.sort(key=order)
    print("| " + " | ".join(HEAD) + " |")
    print("|" + "---|" * len(HEAD))
    cell = lambda r: (r["config"]["defense"]["name"], r["config"]["attack"]["p"])  # noqa: E731
    references = {cell(r): r for r in runs if unattacked(r)}
    for res in runs:
        print("| " + " | ".join(row(res, references.get(cell(res)))) + " |")
    by_prompt_kind(runs)
    if suffixes:
        write_suffixes(runs, Path(suffixes))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the study's multirun folder")
    parser.add_argument("--suffixes", help="write each adaptive run's suffixes here")
    args = parser.parse_args()
    main(args.root, args.suffixes)
