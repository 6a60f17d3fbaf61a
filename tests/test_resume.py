"""Exact resume: the global-batch sampler's position round trips, and a sought sampler goes on
with the uninterrupted order."""
import pytest
import torch
from torch.utils.data import DataLoader

from harness.data.collate import GlobalBatchSampler, global_batch_loader

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


def test_plain_shuffling_loader_reference_still_holds():
    """The order pinned in test_distributed, seen from here once more after a seek(0)."""
    data = list(range(N_ROWS))
    plain = DataLoader(data, batch_size=BATCH, shuffle=True, collate_fn=_ids,
                       generator=torch.Generator().manual_seed(7))
    ours = global_batch_loader(data, BATCH, 7, _ids)
    ours.batch_sampler.seek(0)
    assert _epochs(ours, 3) == _epochs(plain, 3)
