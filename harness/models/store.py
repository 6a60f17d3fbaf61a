"""Models and the tokenizer of a run, read from the artifact store: a stage's model by its
``ModelRef`` (hub, full weights, or an adapter merged onto its parent), and the tokenizer
(the hub's, or the toy tokenizer trained once and stored)."""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from harness.artifacts import ArtifactStore, artifact_key
from harness.distributed import eval_device
from harness.models import gguf, loading
from harness.stages import ModelRef


class ModelStore:
    """``tokenizer_payload`` gives the toy tokenizer's key payload, ``corpus`` the texts it is
    trained on (both called only when a toy tokenizer is built)."""

    def __init__(self, run, store: ArtifactStore, tokenizer_payload: Callable[[], dict],
                 corpus: Callable[[], list[str]]):
        self.run = run
        self.store = store
        self._tokenizer_payload = tokenizer_payload
        self._corpus = corpus
        self._tokenizer = None
        self._gguf_folder: Optional[str] = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
            self.run.template.bind(self._tokenizer)  # template=chat renders through it
        return self._tokenizer

    def hub_path(self) -> Optional[str]:
        """model.gguf: the converted HF folder (built once), which stands in for hf_id."""
        if not self.run.model.gguf:
            return None
        if self._gguf_folder is None:
            self._gguf_folder = str(gguf.hf_folder(self.run.model.gguf, self.store))
        return self._gguf_folder

    def _load_tokenizer(self):
        if self.run.model.source == "hf":
            return loading.load_hf_tokenizer(self.run.model, self.hub_path())
        from transformers import PreTrainedTokenizerFast

        from harness.data.tokenizer import train_toy_tokenizer

        payload = self._tokenizer_payload()
        key = artifact_key(payload)

        def build(tmp: Path, work: Path) -> dict:
            train_toy_tokenizer(self._corpus(),
                                self.run.model.tokenizer_vocab_size).save_pretrained(tmp / "tok")
            return {"payload": payload}

        path, _ = self.store.get_or_build("tokenizer", key, {"format": "tokenizer"}, build)
        return PreTrainedTokenizerFast.from_pretrained(path / "tok")

    def load(self, ref: ModelRef) -> torch.nn.Module:
        manifest = self.store.verified_manifest(ref.stage, ref.key)  # a damaged one raises
        path = self.store.path(ref.stage, ref.key)
        fmt = manifest["format"]
        if fmt == "hub":
            named = manifest.get("payload", {}).get("hf_id")
            if named and named != self.run.model.hf_id:  # alignment.pretrained's model.base_id
                model = loading.load_hf_model(replace(self.run.model, hf_id=named,
                                                      revision=None))
            else:
                model = loading.load_hf_model(self.run.model, self.hub_path())
            loading.resize_for_tokenizer(model, self.tokenizer)
        elif fmt == "full":
            model = loading.load_saved_model(path / "model", self.run.model)
        elif fmt == "adapter":
            parent = self.load(ModelRef(**manifest["parent"]))
            model = loading.merge_adapter(parent, path / "adapter")
        else:
            raise ValueError(f"artifact {ref.stage}/{ref.key}: unknown format {fmt!r}")
        return model

    def eval_model(self, ref: ModelRef) -> torch.nn.Module:
        """A stage's model on this process's evaluation device (its GPU on a GPU run)."""
        return self.load(ref).to(eval_device(self.run.trainer)).eval()

    def align_adapter(self, align: Optional[ModelRef],
                      base: Optional[ModelRef]) -> Optional[Path]:
        """The align stage's LoRA folder when that stage is one adapter on the base model."""
        if align is None or base is None or align == base:
            return None
        manifest = self.store.manifest(align.stage, align.key)  # load() verifies it
        if manifest["format"] != "adapter" or manifest.get("parent") != asdict(base):
            return None
        return self.store.path(align.stage, align.key) / "adapter"
