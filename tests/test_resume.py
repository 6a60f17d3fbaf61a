"""Exact resume: a stage stopped mid-epoch and resumed from its checkpoint ends with the weights of
the uninterrupted run; damaged checkpoints are set aside; checkpoint writes are atomic."""
import errno
import logging
import os
import shutil
import stat

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from harness import artifacts
from harness.artifacts import ArtifactStoreError
from harness.checkpoints import (AtomicCheckpointIO, checkpoint_problem, resumable_checkpoint)
from harness.analysis.gradients import GradientConflict
from harness.config import TrainStageConfig
from harness.validation import validate
from harness.data.collate import GlobalBatchSampler, PadCollator, global_batch_loader
from harness.defenses.base import StageContext
from harness.defenses.sft import SFT
from harness.models.loading import build_tiny
from harness.pipeline import Pipeline
from tests.test_defenses import SMALL, _Tok, model_cfg, rows

N_ROWS, BATCH, STEPS = 22, 4, 15  # 6 batches an epoch (the last of 2 rows): 2.5 epochs
PER_EPOCH = 6


def _ids(rows):
    return rows


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: bit-identical float sums, and a busy CPU is not made slower by spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ================================================================ the sampler alone
def _epochs(loader, epochs):
    return [b for _ in range(epochs) for b in loader]


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_a_sampler_sought_to_any_batch_continues_the_uninterrupted_order(rank, world):
    data = list(range(N_ROWS))
    whole = _epochs(global_batch_loader(data, BATCH, 11, _ids, rank, world), 3)
    assert len(whole) == 3 * PER_EPOCH
    for done in range(len(whole) + 1):
        loader = global_batch_loader(data, BATCH, 11, _ids, rank, world)
        loader.batch_sampler.seek(done)
        rest = [b for b in loader] + _epochs(loader, 3)
        assert rest[:len(whole) - done] == whole[done:], done


def test_replaying_epochs_leaves_the_generator_where_the_loader_left_it():
    """The replay reproduces the loader's own draw (its worker seed) as well as the sampler's,
    so worker seeds and every later epoch match too."""
    for epochs in range(4):
        ran = global_batch_loader(list(range(N_ROWS)), BATCH, 5, _ids)
        _epochs(ran, epochs)
        sought = global_batch_loader(list(range(N_ROWS)), BATCH, 5, _ids)
        sought.batch_sampler.seek(epochs * PER_EPOCH)
        assert torch.equal(ran.generator.get_state(), sought.generator.get_state()), epochs


def test_sampler_state_round_trips_mid_epoch():
    data = list(range(N_ROWS))
    loader = global_batch_loader(data, BATCH, 3, _ids)
    seen = list(loader)  # epoch 0
    it = iter(loader)
    seen += [next(it), next(it), next(it)]  # 3 batches into epoch 1
    state = loader.batch_sampler.state_dict()
    assert state == {"epoch": 1, "batch": 3}
    seen += list(it) + list(loader)
    fresh = global_batch_loader(data, BATCH, 3, _ids)
    fresh.batch_sampler.load_state_dict(state)
    assert list(fresh) + list(fresh) == seen[PER_EPOCH + 3:]
    end = GlobalBatchSampler(N_ROWS, BATCH, torch.Generator().manual_seed(3))
    end.load_state_dict({"epoch": 0, "batch": PER_EPOCH})  # a finished epoch is the next's start
    assert end.state_dict() == {"epoch": 1, "batch": 0}


# ================================================================ a stage, stopped and resumed
class _Stop(RuntimeError):
    pass


class _StopAt(L.Callback):
    """Dies at the start of step ``k``, after step k's checkpoint is on disk: a kill mid-step."""

    def __init__(self, k: int):
        self.k = k

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.k:
            raise _Stop(f"stopped at step {self.k}")


class _Batches(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch["input_ids"].tolist()))


DROPOUT = {**SMALL, "attention_dropout": 0.1}  # random draws in every step: RNG state matters


@pytest.fixture
def pipeline(make_cfg, tmp_path):
    p = Pipeline(validate(make_cfg("logger=none", "trainer.enable_progress_bar=false")), tmp_path)
    p.models._tokenizer = _Tok()
    return p


def _fit(pipeline, work, *callbacks, context=None):
    """What StageTrainer.train does around fit, on a 2-layer model: seeded, then built."""
    L.seed_everything(pipeline.run.seed * 1000 + 1, verbose=False)
    cfg = model_cfg()
    cfg.config_overrides = DROPOUT
    model = build_tiny(cfg, _Tok(), seed=0)
    model.train()
    train_cfg = TrainStageConfig(lr=3e-3, batch_size=BATCH, scheduler="cosine",
                                 warmup_ratio=0.2, weight_decay=0.01, grad_clip=1.0,
                                 checkpoint_every_n_steps=1)
    module = SFT(model=model, train_cfg=train_cfg, total_steps=STEPS, context=context)
    trainer, stats = pipeline.trainer.fit(module, rows(N_ROWS, 0), train_cfg, "align", work, callbacks)
    return module, stats


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return {}


def _reference(pipeline, tmp_path, cache):
    if "weights" not in cache:
        seen = _Batches()
        module, stats = _fit(pipeline, tmp_path / "whole", seen)
        cache.update(weights={k: v.clone() for k, v in module.model.state_dict().items()},
                     seen=seen.seen, stats=stats)
    return cache


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("k", [3, 6, 8], ids=["mid-epoch-0", "epoch-boundary", "mid-epoch-1"])
def test_a_stage_stopped_mid_epoch_resumes_to_the_uninterrupted_weights(pipeline, tmp_path, k,
                                                                         uninterrupted):
    ref = _reference(pipeline, tmp_path, uninterrupted)
    work = tmp_path / "killed"
    with pytest.raises(_Stop):
        _fit(pipeline, work, _StopAt(k))
    assert torch.load(work / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == k
    seen = _Batches()
    module, stats = _fit(pipeline, work, seen)
    assert stats["steps"] == STEPS
    assert seen.seen == ref["seen"][k:]  # the batches the uninterrupted run trained on from k
    assert _max_diff(module.model.state_dict(), ref["weights"]) == 0.0  # bit for bit
    assert stats["final_train_loss"] == ref["stats"]["final_train_loss"]


def test_gradient_conflict_history_survives_a_resume(pipeline, tmp_path):
    """The analysis callback draws alignment batches and runs extra forward passes (dropout
    draws included) between steps; the resumed run still ends bit for bit where the
    uninterrupted one does, and its history is whole."""
    context = StageContext(alignment_data=rows(12, 1), collate=PadCollator(0))
    whole = GradientConflict(every_n_steps=3)
    ref, _ = _fit(pipeline, tmp_path / "whole", whole, context=context)
    with pytest.raises(_Stop):
        _fit(pipeline, tmp_path / "killed", GradientConflict(3), _StopAt(7), context=context)
    resumed = GradientConflict(every_n_steps=3)
    module, _ = _fit(pipeline, tmp_path / "killed", resumed, context=context)
    assert [h["step"] for h in resumed.history] == [0, 3, 6, 9, 12]
    assert resumed.history == whole.history
    assert _max_diff(module.model.state_dict(), ref.model.state_dict()) == 0.0


def test_without_the_data_position_a_resume_replays_other_batches(pipeline, tmp_path,
                                                                  uninterrupted, monkeypatch):
    """The check above has teeth: a loader that forgets its position (the sampler before this
    change) resumes on the first epoch's batches and ends elsewhere."""
    ref = _reference(pipeline, tmp_path, uninterrupted)
    work = tmp_path / "killed"
    with pytest.raises(_Stop):
        _fit(pipeline, work, _StopAt(8))
    monkeypatch.setattr(GlobalBatchSampler, "seek", lambda self, done: None)
    seen = _Batches()
    module, _ = _fit(pipeline, work, seen)
    assert seen.seen[0][1] == ref["seen"][0][1] != ref["seen"][8][1]  # epoch 0 again
    diff = _max_diff(module.model.state_dict(), ref["weights"])
    print(f"max weight difference without the data position: {diff:.3g}")
    assert diff > 1e-4


def test_a_truncated_last_checkpoint_falls_back_to_an_older_one(pipeline, tmp_path, caplog,
                                                                uninterrupted):
    """The full-disk case: last.ckpt is cut short. The stage takes the older checkpoint it
    still has, resumes exactly from there, and keeps the bad file aside for inspection."""
    ref = _reference(pipeline, tmp_path, uninterrupted)
    work = tmp_path / "killed"
    ckpts = work / "checkpoints"
    with pytest.raises(_Stop):
        _fit(pipeline, work, _StopAt(4))
    shutil.copy2(ckpts / "last.ckpt", ckpts / "step-4.ckpt")
    os.utime(ckpts / "step-4.ckpt", (1, 1))
    with pytest.raises(_Stop):
        _fit(pipeline, work, _StopAt(8))
    size = (ckpts / "last.ckpt").stat().st_size
    with open(ckpts / "last.ckpt", "r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="harness.checkpoints"):
        module, stats = _fit(pipeline, work)
    assert f"[align] checkpoint {ckpts / 'last.ckpt'} is unusable: not a zip archive" in caplog.text
    assert "resuming from the older checkpoint" in caplog.text and "step-4.ckpt" in caplog.text
    assert (ckpts / "last.ckpt.corrupt-0").stat().st_size == size // 2
    assert stats["steps"] == STEPS
    assert _max_diff(module.model.state_dict(), ref["weights"]) == 0.0


def test_with_no_usable_checkpoint_the_stage_starts_over(pipeline, tmp_path, caplog,
                                                         uninterrupted):
    ref = _reference(pipeline, tmp_path, uninterrupted)
    work = tmp_path / "killed"
    with pytest.raises(_Stop):
        _fit(pipeline, work, _StopAt(5))
    last = work / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = b"\xff" * 4096  # overwritten, same size
    last.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="harness.checkpoints"):
        module, stats = _fit(pipeline, work)
    assert "fails its CRC check" in caplog.text
    assert "no usable checkpoint" in caplog.text and "starts again from its first step" in \
        caplog.text
    assert (work / "checkpoints" / "last.ckpt.corrupt-0").is_file()
    assert stats["steps"] == STEPS
    assert _max_diff(module.model.state_dict(), ref["weights"]) == 0.0


# ================================================================ checkpoint files
def test_checkpoint_problem_and_choice(tmp_path):
    torch.save({"state_dict": {"w": torch.arange(10000.0)}}, tmp_path / "last.ckpt")
    assert checkpoint_problem(tmp_path / "last.ckpt") is None
    assert resumable_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    (tmp_path / "notes.ckpt").write_bytes(b"PK\x03\x04 not really")
    assert checkpoint_problem(tmp_path / "notes.ckpt") == "not a zip archive (15 bytes; truncated?)"
    (tmp_path / "last.ckpt").write_bytes((tmp_path / "last.ckpt").read_bytes()[:-100])
    assert resumable_checkpoint(tmp_path, set_aside=False) is None  # a DDP worker: skips only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "notes.ckpt"]
    assert resumable_checkpoint(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt.corrupt-0",
                                                          "notes.ckpt.corrupt-0"]
    assert resumable_checkpoint(tmp_path / "absent") is None


def test_atomic_save_leaves_the_previous_checkpoint_whole_when_a_save_fails(tmp_path,
                                                                            monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, target)
    before = target.read_bytes()
    real = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\0" * 5000)  # half a checkpoint reaches the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, target)
    monkeypatch.setattr(torch, "save", real)
    assert os.listdir(target.parent) == ["last.ckpt"] and target.read_bytes() == before
    assert io.load_checkpoint(target)["step"] == 1


def test_atomic_save_writes_a_checkpoint_readable_per_umask(tmp_path):
    old = os.umask(0o022)
    artifacts.umask.cache_clear()
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 3}, tmp_path / "c.ckpt")
    finally:
        os.umask(old)
        artifacts.umask.cache_clear()
    assert stat.S_IMODE((tmp_path / "c.ckpt").stat().st_mode) == 0o644
    assert checkpoint_problem(tmp_path / "c.ckpt") is None
    assert torch.load(tmp_path / "c.ckpt", weights_only=True) == {"step": 3}


def test_plain_shuffling_loader_reference_still_holds():
    """The order pinned in test_distributed, seen from here once more after a seek(0)."""
    data = list(range(N_ROWS))
    plain = DataLoader(data, batch_size=BATCH, shuffle=True, collate_fn=_ids,
                       generator=torch.Generator().manual_seed(7))
    ours = global_batch_loader(data, BATCH, 7, _ids)
    ours.batch_sampler.seek(0)
    assert _epochs(ours, 3) == _epochs(plain, 3)


# ================================================================ the pipeline's artifacts
def test_the_pipeline_never_loads_a_damaged_stage_model(pipeline, caplog):
    """Overwritten weights of the same size (the case that once finished "ok" with HS 0):
    load_model refuses them by name, and the stage sets them aside and rebuilds."""
    builds = []

    def build(tmp, work):
        builds.append(1)
        build_tiny(model_cfg(), _Tok(), seed=0).save_pretrained(tmp / "model")
        return {"format": "full"}

    ref = pipeline.record("align", "a1b2", {"p": 1}, build)
    clean = {k: v.clone() for k, v in pipeline.models.load(ref).state_dict().items()}
    weights = pipeline.store.path("align", "a1b2") / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16384] = b"\x7f" * 16384
    weights.write_bytes(bytes(data))
    artifacts._DIGESTED.clear()  # the next process
    with pytest.raises(ArtifactStoreError, match=r"artifact align/a1b2 at .* cannot be loaded: "
                                                 r"model/model.safetensors has sha256"):
        pipeline.models.load(ref)
    with caplog.at_level(logging.WARNING, logger="harness.artifacts"):
        assert pipeline.record("align", "a1b2", {"p": 1}, build) == ref
    assert "artifact align/a1b2 is damaged (model/model.safetensors has sha256" in caplog.text
    assert len(builds) == 2 and pipeline.record.timings["align"]["reused"] is False
    assert _max_diff(pipeline.models.load(ref).state_dict(), clean) == 0.0
