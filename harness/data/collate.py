"""Tokenisation with loss masking, and padding collators for training and generation."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from harness.data.schema import Example
from harness.data.templates import TemplateConfig

IGNORE_INDEX = -100
log = logging.getLogger("harness")


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, BOS added by hand so every model family is treated alike."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos):  # a chat template writes its own BOS
        return ids
    return [bos] + ids


# a warning when more than this share of a stage's rows lose prompt tokens to max_length
TRUNCATION_WARN_SHARE = 0.05


def fit_length(p_ids: list[int], r_ids: list[int], max_length: int, loss_on: str = "response",
               truncation: str = "middle") -> tuple[list[int], int, int, int]:
    """Prompt and answer ids cut to ``max_length``: (ids, prompt tokens kept, prompt tokens
    cut, answer tokens cut).

    ``loss_on="all"`` (pretraining text) keeps the start. ``"response"`` keeps the answer and its
    EOS whole and cuts the prompt: its middle (``truncation="middle"``: the start, with BOS and
    the instruction, and the end, with the template's answer cue, survive) or its left end
    (``"left"``, BOS kept). The prompt keeps at least half of ``max_length`` (or all of
    itself); only an answer longer than the rest loses its end (and EOS), counted apart.
    """
    n_p, n_r = len(p_ids), len(r_ids)
    if n_p + n_r <= max_length:
        return p_ids + r_ids, n_p, 0, 0
    if loss_on == "all":
        keep_p = min(n_p, max_length)
        return (p_ids + r_ids)[:max_length], keep_p, n_p - keep_p, max(0, n_r - (max_length - keep_p))
    keep_p = max(max_length - n_r, min(n_p, max_length // 2))
    keep_r = max_length - keep_p
    if truncation == "middle":
        head = keep_p - keep_p // 2
        prompt = p_ids[:head] + p_ids[n_p - (keep_p - head):]
    elif truncation == "left":
        bos = p_ids[:1] if keep_p and n_p and keep_p < n_p else []
        prompt = bos + p_ids[n_p - (keep_p - len(bos)):] if keep_p > len(bos) else bos
    else:
        raise ValueError(f"truncation must be 'middle' or 'left', got {truncation!r}")
    return prompt + r_ids[:keep_r], keep_p, n_p - keep_p, n_r - min(n_r, keep_r)


def _encode(tokenizer, template: TemplateConfig, ex: Example, max_length: int,
            loss_on: str = "response", truncation: str = "middle"
            ) -> tuple[dict[str, list[int]], int, int]:
    prompt, response = template.render(ex)
    p_ids = prompt_ids(tokenizer, prompt)
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if not r_ids or r_ids[-1] != tokenizer.eos_token_id:  # a chat turn may end in EOS already
        r_ids = r_ids + [tokenizer.eos_token_id]
    if loss_on not in ("response", "all"):
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    ids, n_prompt, cut_p, cut_r = fit_length(p_ids, r_ids, max_length, loss_on, truncation)
    labels = list(ids) if loss_on == "all" else [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "labels": labels}, cut_p, cut_r


def encode_example(tokenizer, template: TemplateConfig, ex: Example, max_length: int,
                   loss_on: str = "response", truncation: str = "middle") -> dict[str, list[int]]:
    """Prompt and response are tokenised apart, so generation sees exactly the training prompt.

    ``loss_on="response"`` masks the prompt with IGNORE_INDEX; ``"all"`` trains on every token
    (base pretraining). Every response ends with EOS; a row longer than ``max_length`` is cut
    as ``fit_length`` says (the answer kept, the prompt's middle or left end cut).
    """
    return _encode(tokenizer, template, ex, max_length, loss_on, truncation)[0]


_WARNED: set[str] = set()  # truncation warnings given in this run


def forget_warnings() -> None:
    """A new run (a sweep runs several in one process) warns afresh."""
    _WARNED.clear()


class TokenizedDataset(Dataset):
    """Tokenised once up front: the rows are short and reused for every epoch. Rows cut to
    ``max_length`` are counted (``self.truncated``) and logged; a warning names the key when
    more than TRUNCATION_WARN_SHARE of them lose prompt tokens, or any loses answer tokens."""

    def __init__(self, examples: list[Example], tokenizer, template: TemplateConfig,
                 max_length: int, loss_on: str = "response",
                 max_length_key: str = "train.<stage>.max_length", truncation: str = "middle"):
        self.examples = examples
        self.rows, cut_p, cut_r = [], [], []
        for ex in examples:
            row, p, r = _encode(tokenizer, template, ex, max_length, loss_on, truncation)
            # "harmful" rides along for methods that treat the two kinds differently (Ref-Teacher)
            self.rows.append({**row, "harmful": int(ex.kind == "harmful")})
            cut_p.append(p)
            cut_r.append(r)
        n = len(self.rows)
        self.truncated = {"rows": n, "prompt_cut_rows": sum(1 for c in cut_p if c),
                          "prompt_tokens_cut": sum(cut_p),
                          "answer_cut_rows": sum(1 for c in cut_r if c),
                          "answer_tokens_cut": sum(cut_r)}
        t = self.truncated
        if t["prompt_cut_rows"] or t["answer_cut_rows"]:
            first = next(i for i in range(n) if cut_p[i] or cut_r[i])
            where = examples[first].origin or f"row {first}"
            text = (f"{max_length_key}={max_length}: {t['prompt_cut_rows']} of {n} rows lost "
                    f"{t['prompt_tokens_cut']} prompt tokens ({truncation} cut), "
                    f"{t['answer_cut_rows']} rows lost {t['answer_tokens_cut']} answer tokens "
                    f"(the first: {where})")
            if t["answer_cut_rows"] and loss_on == "response" or (
                    t["prompt_cut_rows"] > TRUNCATION_WARN_SHARE * n):
                if text not in _WARNED:  # the same rows are tokenized for several stages
                    _WARNED.add(text)
                    log.warning("%s; raise %s to keep them whole", text, max_length_key)
            else:
                log.info(text)
        # the loss reads labels[1:]: a row with none supervised there adds no token, and a
        # batch of such rows divides 0 by 0 (a NaN that DDP spreads to every rank)
        empty = [i for i, r in enumerate(self.rows)  # ids are >= 0 > IGNORE_INDEX
                 if max(r["labels"][1:], default=IGNORE_INDEX) == IGNORE_INDEX]
        if empty:
            first = examples[empty[0]]
            text = " ".join(first.instruction.split())[:60]
            raise ValueError(
                f"{len(empty)} of {len(self.rows)} rows have no answer token to learn after "
                f"truncation to {max_length} tokens (rows {empty[:10]}; the first is "
                f"{first.origin or f'row {empty[0]}'}, beginning {text!r}). Raise "
                f"{max_length_key}, or drop those rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


@dataclass
class PadCollator:
    pad_token_id: int

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids, mask = right_pad([r["input_ids"] for r in rows], self.pad_token_id)
        labels, _ = right_pad([r["labels"] for r in rows], IGNORE_INDEX)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if "harmful" in rows[0]:
            batch["harmful"] = torch.tensor([r["harmful"] for r in rows], dtype=torch.long)
        return batch


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding (training batches, features, opening scores): every row starts at column
    0, so positions match an unpadded forward; (ids, attention mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding for generation: every prompt ends at the same column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def _loader_draw(generator: torch.Generator) -> None:
    """The worker base seed a DataLoader iterator takes from its generator when it is created,
    before the sampler's first draw (torch.utils.data.dataloader._BaseDataLoaderIter)."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)


class GlobalBatchSampler(Sampler[list[int]]):
    """Shuffled batches of a *global* size, each split across the ranks.

    Every epoch is one permutation drawn from ``generator``; each run of ``global_batch`` rows of
    it is one optimiser step, and rank r takes rows r, r + world, ... of it. One process draws
    exactly what ``DataLoader(shuffle=True, generator=...)`` draws, so k processes see the data
    of the one-process run, step by step (a closing batch with fewer rows than ranks is
    dropped, since every rank must step). Lightning's own distributed sampler would reshuffle
    per rank and change the data each step sees (ENV_NOTES).

    Resumable: epoch e's order is a function of the generator's first state and e alone, so
    ``load_state_dict`` replays e epochs of draws (the loader's and the sampler's) from that
    state and skips the batches of epoch e already trained on. The generator must be the one
    its DataLoader draws from, and the state loaded before the loader's iterator is made."""

    def __init__(self, n: int, global_batch: int, generator: torch.Generator, rank: int = 0,
                 world: int = 1):
        if global_batch % world:
            raise ValueError(f"batch_size={global_batch} is the global batch; it must divide by "
                             f"the {world} training processes")
        self.n, self.global_batch, self.generator = n, global_batch, generator
        self.rank, self.world = rank, world
        self._origin = generator.get_state()
        self.epoch = 0  # the epoch the next iteration draws
        self.batch = 0  # batches of it already handed out (or, after a load, trained on)
        self._skip = 0

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return full + int(rest >= self.world)

    def _draw_epoch(self) -> list[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        # RandomSampler draws a second, empty-sliced permutation at the end of every epoch;
        # drawing it too keeps later epochs identical to the plain shuffling loader's
        torch.randperm(self.n, generator=self.generator)
        steps = [order[s:s + self.global_batch] for s in range(0, self.n, self.global_batch)]
        return [step for step in steps if len(step) >= self.world]

    def __iter__(self):
        steps = self._draw_epoch()
        skip, self._skip = self._skip, 0
        self.batch = skip
        for step in steps[skip:]:
            self.batch += 1
            yield step[self.rank::self.world]
        self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """(epoch, batches of it handed out). With a loader that reads ahead (workers), the
        batches trained on are fewer: ``seek`` takes that count from the trainer instead."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if len(self):  # a finished epoch is the start of the next
            epoch, batch = epoch + batch // len(self), batch % len(self)
        self.generator.set_state(self._origin)
        for _ in range(epoch):
            _loader_draw(self.generator)
            self._draw_epoch()
        self.epoch, self.batch, self._skip = epoch, batch, batch

    def seek(self, batches_done: int) -> None:
        """Start where an uninterrupted run stands after ``batches_done`` batches (every
        epoch has ``len(self)``)."""
        self.load_state_dict({"epoch": 0, "batch": batches_done})


def global_batch_loader(dataset: Dataset, global_batch: int, seed: int, collate,
                        rank: int = 0, world: int = 1) -> DataLoader:
    """This rank's loader. The loader draws its worker seed from the same generator before the
    sampler draws, as a shuffling DataLoader does, which keeps the one-process order unchanged."""
    generator = torch.Generator().manual_seed(seed)
    sampler = GlobalBatchSampler(len(dataset), global_batch, generator, rank, world)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=generator)


class StageData(L.LightningDataModule):
    """A training stage's data. The loader is built once Lightning knows this process's rank
    and the world size (after the strategy launched the ranks), from the global batch.

    Its state in a checkpoint is the number of batches trained; a fit resumed from it builds
    its loader where the uninterrupted run's stood (Lightning restores a datamodule before it
    asks for the loader). Lightning itself would replay the first epoch's order."""

    def __init__(self, dataset: Dataset, global_batch: int, seed: int, collate,
                 key: str = "batch_size"):
        super().__init__()
        self.dataset, self.global_batch, self.seed, self.collate = (dataset, global_batch, seed,
                                                                    collate)
        self.key = key  # the config key named when the batch does not split across the ranks
        self.batches_done = 0  # from a checkpoint: where the loader starts

    def train_dataloader(self) -> DataLoader:
        try:
            loader = global_batch_loader(self.dataset, self.global_batch, self.seed,
                                         self.collate, self.trainer.global_rank,
                                         self.trainer.world_size)
        except ValueError as err:
            raise ValueError(f"{self.key}: {err} (trainer.devices x trainer.num_nodes)") from err
        loader.batch_sampler.seek(self.batches_done)
        return loader

    def state_dict(self) -> dict[str, int]:
        # the trainer's count of batches whose step ran, not the sampler's: a loader with
        # workers fetches ahead of training
        trainer = self.trainer
        if trainer is None:
            return {}
        return {"batches_done": int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches_done = int(state.get("batches_done", 0))
