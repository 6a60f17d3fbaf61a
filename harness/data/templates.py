"""Prompt formats: ``TemplateConfig`` is a config node, so it lives with the schema
(``harness/config/template.py``); imported here under its older name."""
from harness.config.template import ALPACA, CHAT, NO_SYSTEM_SLOT, TemplateConfig

__all__ = ["ALPACA", "CHAT", "NO_SYSTEM_SLOT", "TemplateConfig"]
