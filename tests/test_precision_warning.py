"""A CPU run that asks for bf16 on a CPU without bf16 kernels is told so at start-up (on an
AVX2 EPYC a bf16 matmul's forward and backward ran 17x slower than fp32)."""
import pytest

from harness import training
from harness.config.schema import TrainerConfig


@pytest.mark.parametrize("has_bf16, cfg, warns", [
    (False, TrainerConfig(precision="bf16-mixed"), True),
    (False, TrainerConfig(precision="bf16-true"), True),
    (True, TrainerConfig(precision="bf16-mixed"), False),
    (False, TrainerConfig(precision="32-true"), False),
    (False, TrainerConfig(accelerator="gpu", precision="bf16-mixed"), False),
])
def test_bf16_without_kernels_names_the_key_to_change(monkeypatch, has_bf16, cfg, warns):
    monkeypatch.setattr(training, "cpu_has_bf16_kernels", lambda: has_bf16)
    msg = training.warn_slow_precision(cfg)
    assert (msg is not None) == warns
    if warns:
        assert f"trainer.precision={cfg.precision}" in msg and "trainer.precision=32-true" in msg


def test_the_probe_answers_on_this_machine():
    assert isinstance(training.cpu_has_bf16_kernels(), bool)
