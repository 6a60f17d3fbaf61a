"""What a run needs of this machine, checked at start-up before any data loads or any step
trains: the devices the trainer asks for, and every model the run will load (the hub base, the
run's judge, a panel's judges, the filter's judge). ``validate`` checks the config alone and
holds anywhere (a GPU config validates on a laptop, a 7B judge's settings without its weights);
``preflight`` checks the machine the run is on. A problem raises ConfigError naming the key and
the fix, so the console shows one line instead of a traceback after hours of training.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from harness.config.schema import ConfigError, RunConfig, TrainerConfig, _check


def preflight(run: RunConfig) -> None:
    """Raise ConfigError if this machine cannot finish the run (devices, models, endpoints)."""
    check_devices(run.trainer)
    if run.model.source == "hf" and run.model.hf_id:
        check_model_available(run.model.hf_id, run.model.revision, "model.hf_id",
                              f"model={run.model.name}")
    if run.model.base_id:
        check_model_available(run.model.base_id, None, "model.base_id",
                              f"model={run.model.name}'s base")
    check_judges(run)


def check_judges(run: RunConfig) -> None:
    """Each judge the run builds (harness.evaluation.registry.needed_judges): a moderation
    judge's weights are here, an LLM judge's endpoint is set."""
    from harness.evaluation.llm_judge import resolve_endpoint
    from harness.evaluation.registry import entry, needed_judges

    for name, asked_by in needed_judges(run).items():
        who = f"judge={name}" if asked_by == "judge.name" else f"{name} (in {asked_by})"
        if (key := entry(name).model_key()) is not None:
            settings = entry(name).settings_in(run)
            check_model_available(getattr(settings, entry(name).model),
                                  getattr(settings, "revision", None), key, who)
        elif name == "llm_rubric":
            try:
                resolve_endpoint(run.llm_judge)
            except ValueError as err:
                raise ConfigError(f"{err} (asked for by {asked_by})") from err


def check_model_available(model_id: str, revision: Optional[str], key: str, who: str) -> None:
    """``model_id`` (a hub id or a local folder) can be loaded here: the folder holds a
    config.json, or the hub id's config.json is in the HF cache or, online, downloads."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        _check((path / "config.json").is_file(), key,
               f"{who} loads the folder {path}, which holds no config.json (a save_pretrained "
               "layout); point it at the model's folder")
        return
    if model_id.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"{key}: {who} loads the folder {path}, which does not exist; give "
                          "the folder that holds the model (a save_pretrained layout) or a hub id")
    from transformers.utils import cached_file

    try:
        cached_file(model_id, "config.json", revision=revision)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        if offline:
            from huggingface_hub.constants import HF_HUB_CACHE

            why = (f"is not in the local HF cache ({HF_HUB_CACHE}) and the hub is offline "
                   "(HF_HUB_OFFLINE=1)")
            fix = (f"set {key} to a local folder holding it, or run once with HARNESS_ONLINE=1 "
                   "where the hub is reachable (gated models also need `huggingface-cli login`)")
        else:
            first = " ".join(str(err).split())[:200]
            why = f"could not be fetched from the hub ({first})"
            fix = (f"check the id and your access to it (gated models need "
                   f"`huggingface-cli login`), or set {key} to a local folder")
        raise ConfigError(f"{key}: {who} loads '{model_id}'"
                          f"{f' at revision {revision}' if revision else ''}, which {why}; "
                          f"{fix}") from err


def check_devices(trainer: TrainerConfig) -> None:
    """The devices Lightning would refuse at the first stage's Trainer, refused here first."""
    import torch

    from harness.distributed import wants_gpu

    devices = trainer.devices
    if OmegaConf.is_list(devices):
        devices = list(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    allowed = ("give a count >= 1, a list of device indices ([0, 1]), or -1 / auto for every "
               "device")
    _check(not (isinstance(devices, (list, tuple)) and not devices), "trainer.devices",
           f"an empty list trains on no device; {allowed}")
    _check(not isinstance(devices, int) or devices >= 1 or devices == -1, "trainer.devices",
           f"{devices} trains on no device; {allowed}")
    if not wants_gpu(trainer.accelerator) or trainer.accelerator == "auto":
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    _check(torch.cuda.is_available(), "trainer.accelerator",
           f"{trainer.accelerator}, but torch sees no CUDA device here (torch {torch.__version__}"
           f"{f', CUDA_VISIBLE_DEVICES={visible!r}' if visible is not None else ''}); use "
           "trainer=cpu (or trainer=ddp_cpu for several processes), or run where a GPU is "
           "visible")
    count = torch.cuda.device_count()
    if isinstance(devices, int) and devices > 0:
        _check(devices <= count, "trainer.devices",
               f"{devices} GPUs asked for, {count} visible; give at most {count}, or -1 for all")
    elif isinstance(devices, (list, tuple)):
        missing = [d for d in devices if not (isinstance(d, int) and 0 <= d < count)]
        _check(not missing, "trainer.devices",
               f"GPU indices {missing} do not exist here ({count} visible: 0..{count - 1})")
