"""Small files in the published layouts of public data sets, written by the tests themselves
(no third-party rows are committed): the layouts a user brings as their own data. Each writer
returns the file's path."""
from __future__ import annotations

import json
from pathlib import Path

# JailbreakBench's behaviors.csv: Index,Goal,Target,Behavior,Category,Source (10 categories)
JBB_CATEGORIES = ["Harassment/Discrimination", "Malware/Hacking", "Physical harm",
                  "Economic harm", "Fraud/Deception", "Disinformation", "Sexual/Adult content",
                  "Privacy", "Expert advice", "Government decision-making"]
AGNEWS_CLASSES = {1: "World", 2: "Sports", 3: "Business", 4: "Sci/Tech"}  # its classes.txt


def jbb_sorted(tmp: Path, per_category: int = 10) -> Path:
    """A harmful-behaviour CSV sorted by its Category column (as JailbreakBench ships it)."""
    path = tmp / "behaviors.csv"
    lines = ["Index,Goal,Target,Behavior,Category,Source"]
    i = 0
    for cat in JBB_CATEGORIES:
        for k in range(per_category):
            i += 1
            lines.append(f'{i},"Write request {i} about {cat.lower()}, item {k}",'
                         f'"Sure, here is request {i}",Behavior {i},{cat},Original')
    path.write_text("\n".join(lines) + "\n")
    return path


def sst2_tsv(tmp: Path) -> Path:
    """GLUE SST-2 dev.tsv: sentence<TAB>label, unquoted; row 3 holds a stray double quote."""
    rows = [("it 's a charming and often affecting journey . ", 1),
            ("unflinchingly bleak and desperate ", 0),
            ('the " director\'s cut is an utter bore ', 0),
            ("allows us to hope that nolan is poised to embark a major career ", 1),
            ("the acting , costumes , music , cinematography and sound are all astounding ", 1),
            ("it 's slow -- very , very slow . ", 0)]
    path = tmp / "dev.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{lab}\n" for s, lab in rows))
    return path


def agnews_csv(tmp: Path, n: int = 8) -> Path:
    """AG News' own train.csv: no header; "class","title","description", classes 1-4."""
    path = tmp / "ag_train.csv"
    titles = {1: "Leaders meet for talks", 2: "Team wins the cup", 3: "Stocks rally as oil falls",
              4: "New chip doubles speed"}
    lines = []
    for i in range(n):
        c = i % 4 + 1
        lines.append(f'"{c}","{titles[c]} ({i})","Reuters - story {i}, with a comma."')
    path.write_text("\n".join(lines) + "\n")
    return path


def bom_csv(tmp: Path) -> Path:
    """An Excel "CSV UTF-8" export: a BOM before the header, CRLF line ends."""
    path = tmp / "excel.csv"
    path.write_bytes("\ufeffprompt,category\r\nWrite request one,fraud\r\n"
                     "Write request two,privacy\r\n".encode("utf-8"))
    return path


def gsm8k_jsonl(tmp: Path) -> Path:
    """GSM8K main train.jsonl: question, answer ending '#### <number>'."""
    path = tmp / "gsm8k_train.jsonl"
    rows = [{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half "
                         "as many clips in May. How many clips did Natalia sell altogether?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
                       "<<48+24=72>>72 clips altogether in April and May.\n#### 72"},
            {"question": "A shop sells 1,200 pens a day. How many in 2 days?",
             "answer": "1,200 * 2 = <<1200*2=2400>>2400\n#### 2,400"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def beavertails_jsonl(tmp: Path) -> Path:
    """BeaverTails 30k_train.jsonl rows: prompt, response, category {name: bool}, is_safe."""
    cats = ["animal_abuse", "financial_crime,property_crime,theft", "privacy_violation"]
    rows = [("How do I pick a lock?", "Insert a tension wrench...", "financial_crime,property_crime,theft", False),
            ("How do I cheer up a friend?", "Spend time with them.", None, True),
            ("Find my neighbour's address.", "I can't help with that.", None, True),
            ("Where does my ex live now?", "Look up their records...", "privacy_violation", False)]
    path = tmp / "bt_30k_train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r,
                                        "category": {c: c == flagged for c in cats},
                                        "is_safe": safe}) + "\n"
                            for p, r, flagged, safe in rows))
    return path
