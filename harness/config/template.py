"""Prompt formats. A template turns an Example into (prompt text, response text)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the schema imports nothing from the package
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
        if system is None:  # a row may carry its own (identity-shift chats train under one)
            system = ex.meta.get("system", self.system)
        if self.name == CHAT:
            return self._chat(self._messages(ex, system), add_generation_prompt=True)
        body = (self.prompt_with_input if ex.input else self.prompt).format(
            instruction=ex.instruction, input=ex.input)
        sys_text = system
        return f"{sys_text}{body}" if sys_text else body

    @property
    def has_system_slot(self) -> bool:
        """Whether a system prompt has a place: the plain format's prefix does; a format that
        opens with its own fixed preamble (Alpaca) does not. A chat template has one when it
        renders a system message (Gemma's raises); before a tokenizer is bound that is not
        known, so True, and rendering a system prompt without a slot then fails loudly."""
        if self.name == CHAT:
            tok = getattr(self, "_tokenizer", None)
            return tok is None or _chat_has_system(tok)
        return self.name not in NO_SYSTEM_SLOT

    def render(self, ex: Example) -> tuple[str, str]:
        if self.name != CHAT:
            return self.render_prompt(ex), self.response_prefix + ex.output
        # The response is what the whole conversation adds to the prompt: the answer and the
        # template's own end-of-turn markers, which the model must learn to emit.
        prompt = self.render_prompt(ex)
        system = ex.meta.get("system", self.system)
        full = self._chat(self._messages(ex, system) + [{"role": "assistant", "content": ex.output}],
                          add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError("template=chat: this chat template renders the prompt differently "
                             "inside a whole conversation, so prompt and response cannot be split "
                             "for loss masking; use template=alpaca")
        return prompt, full[len(prompt):]

    # ------------------------------------------------------------ chat
    def bind(self, tokenizer) -> "TemplateConfig":
        """Give a chat template its tokenizer (an attribute, not a field: keys ignore it)."""
        self._tokenizer = tokenizer
        return self

    @staticmethod
    def _messages(ex: Example, system: str) -> list[dict[str, str]]:
        user = f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}]

    def _chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        tok = getattr(self, "_tokenizer", None)
        if tok is None:
            raise ValueError("template=chat renders through the model's tokenizer, and none is "
                             "bound (TemplateConfig.bind)")
        if not getattr(tok, "chat_template", None):
            raise ValueError("template=chat: this model's tokenizer ships no chat template; use "
                             "template=alpaca, or a chat/instruct model")
        if messages[0]["role"] == "system" and not _chat_has_system(tok):
            raise ValueError("template=chat: this model's chat template has no system role, but "
                             "a system prompt was given (eval.system_prompt, template.system or "
                             "the attack's); drop it or use a template with a system slot")
        return tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)


CHAT = "chat"  # the template name that renders through tokenizer.apply_chat_template


def _chat_has_system(tokenizer) -> bool:
    probe = "\x00system-probe\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
            tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - jinja raise_exception: "System role not supported"
        return False
    return probe in text


NO_SYSTEM_SLOT = frozenset({"alpaca"})  # template names whose format has no system role
