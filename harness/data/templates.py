"""Prompt formats. A template turns an Example into (prompt text, response text)."""
from __future__ import annotations

from dataclasses import dataclass

from harness.data.schema import Example


@dataclass
class TemplateConfig:
    """A plain-text prompt format; ``{instruction}``, ``{input}`` and ``{system}`` are filled in.

    ``system`` is prefixed to every prompt (some protocols put a system prompt on evaluation
    prompts only: that lives in the eval config, not here).
    """

    name: str = "toy"
    prompt: str = "User: {instruction}\nAssistant:"
    prompt_with_input: str = "User: {instruction}\n{input}\nAssistant:"
    response_prefix: str = " "
    system: str = ""

    def render_prompt(self, ex: Example, system: str | None = None) -> str:
        body = (self.prompt_with_input if ex.input else self.prompt).format(
            instruction=ex.instruction, input=ex.input)
        sys_text = self.system if system is None else system
        return f"{sys_text}{body}" if sys_text else body

    def render(self, ex: Example) -> tuple[str, str]:
        return self.render_prompt(ex), self.response_prefix + ex.output


ALPACA = TemplateConfig(
    name="alpaca",
    prompt=("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
    prompt_with_input=("Below is an instruction that describes a task, paired with an input that "
                       "provides further context. Write a response that appropriately completes "
                       "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
                       "\n\n### Response:\n"),
    response_prefix="",
)
