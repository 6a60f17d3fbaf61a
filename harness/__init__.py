"""Experiment harness for harmful-finetuning attacks and defenses on LLMs.

Importing the package sets the offline defaults before any HF or W&B import: a hub lookup that
is switched off after import still retries for 20-50 s before it fails (ENV_NOTES).
A user who wants the hub sets ``HARNESS_ONLINE=1``.
"""
import os

if os.environ.get("HARNESS_ONLINE", "0") != "1":
    for _key, _value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }.items():
        os.environ.setdefault(_key, _value)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Known, harmless deprecation noise from pinned libraries (ENV_NOTES): keep the console readable.
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

__version__ = "0.1.0"
