"""Prompt formats: ``TemplateConfig`` is a config node, so it lives with the schema
(``harness/config/template.py``); imported here under its older name. The formats
themselves are config: conf/template/<name>.yaml (alpaca, chat)."""
from harness.config.template import CHAT, NO_SYSTEM_SLOT, TemplateConfig

__all__ = ["CHAT", "NO_SYSTEM_SLOT", "TemplateConfig"]
