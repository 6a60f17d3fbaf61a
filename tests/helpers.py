"""What several test files share: the tiny run's overrides, the small model size, and one
builder of tiny random Llamas. Test files import from here, not from each other."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]

# A whole run in seconds: a small toy world, a few steps per stage, short evaluations.
TINY = ["logger=none", "trainer.enable_progress_bar=false", "world.base_size=300",
        "world.align_size=100", "train.base.max_steps=4", "train.align.max_steps=3",
        "train.finetune.max_steps=3", "attack.n=40", "eval.harmful_size=16",
        "eval.task_size=8", "eval.max_new_tokens=4", "model.tokenizer_vocab_size=400"]

# The bound on a subprocess a test waits for: it catches a hang, and a tiny run or sweep at a
# load of 6 on 2 cores stays far under it, so no test fails for a busy machine.
HANG_S = 1200



def wait_until(condition: Callable[[], object], timeout: float = HANG_S, *,
               while_running=None, interval: float = 0.1) -> bool:
    """Poll ``condition`` until it holds (True), the deadline passes or ``while_running`` (a
    Popen) exits (False). The one place a test waits: for an event, never for a fixed time;
    ``timeout`` only catches a hang, so it is generous."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or (while_running is not None
                                            and while_running.poll() is not None):
            return bool(condition())
        time.sleep(interval)
    return True


# A model small enough to build and step in milliseconds (model.config_overrides).
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2}


def tiny_llama(vocab_size: int, seed: int = 0, **config):
    """A random ``LlamaForCausalLM`` of ``SMALL`` size (``config`` overrides any field of
    ``LlamaConfig``), its weights drawn after ``torch.manual_seed(seed)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**SMALL, **config}))


def free_port() -> int:
    """A TCP port free on this host now, for a test's own gloo rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refuse_network(monkeypatch) -> list:
    """Make every socket connection fail, and return the list of addresses tried.

    An empty list after a hub call shows it never reached for the network, so none of the hub
    client's retries (20-50 s) can have happened: the property "fails at once" as an event,
    not as a time a busy machine may overrun."""
    import socket

    tried: list = []

    def connect(self, address):
        tried.append(address)
        raise OSError(f"network refused in this test: {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return tried


def harness_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -m harness`` subprocess: this checkout's harness first on
    the path, whatever other checkout an editable install of the venv points at."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
