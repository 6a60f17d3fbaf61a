"""A full disk is recognised in the errors the writers really raise: /dev/full gives a real
ENOSPC to any user, and a small tmpfs (mounted where the test may) fills up under a real run."""
import errno
import json
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from harness.disk import disk_full_hint, free_space
from tests.test_cli import TINY

DEV_FULL = Path("/dev/full")
# a character device; a writer that renames a temp file over its target (safetensors) would
# replace it with a regular file, so only writers that write in place are tried on it
needs_dev_full = pytest.mark.skipif(not DEV_FULL.is_char_device(), reason="no /dev/full here")


def raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - the error itself is under test
        return err
    raise AssertionError("no error")


@needs_dev_full
def test_torch_save_to_a_path_hides_the_errno_and_is_still_recognised():
    err = raised(lambda: torch.save({"w": torch.zeros(1_000_000)}, str(DEV_FULL)))
    assert type(err) is RuntimeError and "unexpected pos" in str(err)  # torch's C++ writer
    assert not any(isinstance(e, OSError) for e in (err.__cause__, err.__context__))
    hint = disk_full_hint(err)
    assert hint.startswith("no space left on the disk (torch's file writer stopped mid-file")
    assert "rerun the same command" in hint and "resumes from its last checkpoint" in hint


@needs_dev_full
def test_torch_save_through_a_file_and_a_librarys_os_text_are_recognised():
    def through_file():
        with open(DEV_FULL, "wb") as f:
            torch.save({"w": torch.zeros(1_000_000)}, f)

    err = raised(through_file)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert disk_full_hint(err).startswith("no space left on the disk.")
    # safetensors on a full tmpfs (its /dev/full write succeeds): the OS's text, no errno
    err = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_full_hint(err) is not None


def test_an_enospc_deep_in_the_chain_is_found_and_other_errors_get_no_hint(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors")
        except OSError as inner:
            raise RuntimeError("saving the adapter failed") from inner
    except RuntimeError as err:
        assert "writing /x/model.safetensors" in disk_full_hint(err)
    assert disk_full_hint(RuntimeError("shape mismatch")) is None
    assert disk_full_hint(OSError(errno.EACCES, "Permission denied")) is None
    free = free_space([tmp_path / "not" / "yet" / "made", tmp_path])
    assert len(free) == 1 and free[0].endswith(f"MiB free at {tmp_path}")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (mounting needs root or CAP_SYS_ADMIN: skipped without)."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_run_whose_artifact_store_fills_up_says_what_to_free(make_cfg, tmp_path, small_tmpfs):
    from harness import run as cli

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = make_cfg(*TINY, f"paths.artifacts={small_tmpfs / 'artifacts'}")
    with pytest.raises(Exception) as caught:
        cli.execute(cfg, run_dir)
    hint = disk_full_hint(caught.value, cli.disk_paths(cfg, run_dir))
    assert hint is not None, repr(caught.value)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed"
    error = results["error"].split("\n")[0]
    assert "no space left on the disk" in error and f"MiB free at {small_tmpfs}" in error
    assert "rerun the same command" in error
    print(error)  # the message a user reads (-s shows it)
    assert not list((small_tmpfs / "artifacts").glob("*/.tmp-*"))  # nothing half-written kept
