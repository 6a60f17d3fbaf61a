"""With the progress bar off, a long stage still says how far it is (training.ProgressLog)."""
import logging
from types import SimpleNamespace

import torch

from harness.training import ProgressLog


def test_logs_at_most_every_interval_and_at_the_last_step(caplog):
    now = [0.0]
    cb = ProgressLog("SFT", every_s=60.0, clock=lambda: now[0])
    trainer = SimpleNamespace(global_step=0, max_steps=10, is_global_zero=True,
                              callback_metrics={"train/loss": torch.tensor(1.25)})
    cb.on_train_start(trainer, None)
    with caplog.at_level(logging.INFO, logger="harness"):
        for step in range(1, 11):  # 25 s a step: lines at steps 3 (75 s), 6 (150 s), 9, 10
            now[0], trainer.global_step = 25.0 * step, step
            cb.on_train_batch_end(trainer, None, None, None, step - 1)
    lines = [r.getMessage() for r in caplog.records]
    assert [int(m.split("step ")[1].split("/")[0]) for m in lines] == [3, 6, 9, 10]
    assert lines[0] == "[SFT] step 3/10, loss 1.2500, 25.00 s/step, about 175 s left"
    assert lines[-1].endswith("about 0 s left")


def test_a_resume_measures_its_own_pace(caplog):
    now = [100.0]
    cb = ProgressLog("SFT", every_s=0.0, clock=lambda: now[0])
    trainer = SimpleNamespace(global_step=40, max_steps=50, is_global_zero=True,
                              callback_metrics={})
    cb.on_train_start(trainer, None)
    now[0], trainer.global_step = 110.0, 42
    with caplog.at_level(logging.INFO, logger="harness"):
        cb.on_train_batch_end(trainer, None, None, None, 0)
    assert caplog.records[0].getMessage() == "[SFT] step 42/50, loss -, 5.00 s/step, about 40 s left"
