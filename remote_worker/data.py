"""The training data: canonical records (or their pre-tokenized ids) packed into micro-batches.

A micro-batch is one forward/backward pass of about `micro_batch_tokens` tokens.

Packing on (the default): one row of whole sequences laid end to end, without padding.
`position_ids` restart at 0 for each sequence, and from them transformers builds a
block-diagonal causal mask (SDPA) or uses FA2's varlen path, so no token attends to another
sequence. `labels` are the token ids where the loss mask is 1, else -100, and -100 at each
sequence's first token, so no token is predicted from the previous sequence's end.
With `pad_to` (the recipe sets it to micro_batch_tokens on CUDA), a row is filled with pad
tokens forming one more, untrained, sequence: up to the next multiple of `pad_multiple`
(PAD_MULTIPLE, 256 on CUDA), at most pad_to, so steps take a few shapes only. Filling every
row to pad_to cost rows of ~6k tokens in 8k micro-batches a quarter of each step: on an H200
capped to 40 GB (7B, 2026-11-30, bench/memory_fit.py, best-fit packing) 10,137 real tokens/s
filled to 8,192, 12,036 to a multiple of 1,024, 12,397 of 256; short rows at 24 GB 12,412,
13,521 and 13,723; the 14B at 24 GB 4,328, 5,930 and 5,934 (docs/benchmarks.md). Why fill at all (an H100, random Qwen2.5-7B, nf4, LoRA r=16 all-linear, 8192-token
micro-batches, steps 4-20, filled to pad_to against ragged lengths): 4,100 real tokens/s
against 3,770; a steady 1.75 s a step against 1.9-2.1 s plus 4 s outliers. The calibration
measures the full micro-batch, so an OOM still shows at once, not hours in.

With `varlen` (the recipe sets it when attention is flash_varlen or flash_attention_2,
remote_worker.fast), a packed row also carries the sequence boundaries the flash kernels take:
`cu_seq_lens_q/k` (int32: 0, the end of each sequence, the filler's end) and
`max_length_q/k` (the longest sequence, a Python int). transformers passes them through to
the attention function. SDPA does not need them, and they are left out then, as a precaution:
a model's own code (trust_remote_code) may reject keywords it does not know.

Micro-batch size: `train.micro_batch_tokens`, or when 0, measured on CUDA before training
(remote_worker.calibrate: 16,384, 8,192 or 4,096 tokens, with or without checkpointing, the
fastest that fits) and max_length on the CPU. For reference, on an H100 with the fast paths on
(random Qwen2.5-7B, nf4, all-linear r=16, checkpointing on; docs/benchmarks.md): 16,384 tokens
ran 11,658 tokens/s at 12.1 GB allocated, 8,192 ran 10,979 at 8.9 GB, 32,768 gave no more
(11,270 at 18.3 GB). That 12.1 GB relies on Liger's fused cross-entropy
(remote_worker.fast.liger); without it the logits of 16k tokens come back, which the
calibration sees as memory.

Packing off: one sequence a row, rows right-padded to the longest, with an attention_mask.

Order: which sequences share a micro-batch is `jobs.packing.pack` (shuffled once with train.seed,
then best-fit decreasing; a resume keeps its checkpoint's packer), the packer the laptop's report
estimates with too. The Trainer's sampler, seeded
with train.seed too, shuffles the micro-batches each epoch; their make-up stays the same across epochs.

More than one process (remote_worker.distributed): the Trainer (accelerate) deals the shuffled
micro-batches out in turn, micro-batch i to rank i mod N, and an optimizer step takes N x grad_accum
of them. When their number is not a multiple of that, accelerate would train the first ones of the
epoch twice to even the ranks out; instead `multiple` adds filler micro-batches that train nothing
(one pad token, label -100), so every token is trained once an epoch. A step's loss is divided by
the trained tokens of the whole step, so fillers change no gradient. The padding depends only on
N x grad_accum, the global batch: a resume onto another number of GPUs with the same global batch
sees the same micro-batches in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from jobs import tokenize
from jobs.layout import DATASET_MANIFEST
from jobs.memory import UNMEASURED_TOKENS
from jobs.packing import DEFAULT as DEFAULT_PACKER
from jobs.packing import pack
from jobs.protocol import DatasetManifest, ProtocolError, read_model
from jobs.spec import TrainSpec
from remote_worker import DataError

IGNORE = -100  # the label the loss skips
GPU_MIN_MICRO_BATCH_TOKENS = UNMEASURED_TOKENS  # 16,384: the measured best packed micro-batch on an H100 (docstring)


class Seq(NamedTuple):
    ids: np.ndarray  # token ids
    mask: np.ndarray  # 1 = trained token


@dataclass
class Split:
    name: str
    sequences: list[Seq] = field(default_factory=list)
    source: str = "none"  # "pre-tokenized", "tokenized" or "none" (no file)
    dropped: int = 0  # records over max_length (overlong = "drop") or with no trained token

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.sequences)


def batch_shape(train: TrainSpec, max_length: int, device: str) -> tuple[int, int]:
    """(micro_batch_tokens, gradient accumulation steps) without measuring: the CPU's shape, and
    the one a checkpoint saved before shapes were saved with it was trained with.

    micro_batch_tokens = train.micro_batch_tokens, or when 0: max(max_length, 16384) on CUDA,
    max_length on the CPU. grad_accum: see `grad_accum`.
    """
    micro = train.micro_batch_tokens
    if micro == 0:
        micro = max(max_length, GPU_MIN_MICRO_BATCH_TOKENS) if device == "cuda" else max_length
    return micro, grad_accum(train, micro, max_length)


def global_batch_tokens(train: TrainSpec, mean_sequence_tokens: float | None) -> int:
    """Tokens per optimizer step: train.global_batch_tokens, or train.global_batch_sequences times the mean
    length of the train sequences (packing fills micro-batches with tokens, so N sequences of the mean
    length are, on average, N sequences a step; max_length instead would take far fewer where most
    sequences are short). Without a mean (nothing tokenized yet) max_length stands in: see the caller."""
    if train.global_batch_sequences:
        return round(train.global_batch_sequences * (mean_sequence_tokens or 1))
    return train.global_batch_tokens


def grad_accum(train: TrainSpec, micro_batch_tokens: int, mean_sequence_tokens: float | None = None) -> int:
    """Micro-batches per optimizer step: the global batch in tokens (`global_batch_tokens`) / micro_batch_tokens
    rounded, at least 1."""
    tokens = global_batch_tokens(train, mean_sequence_tokens)
    if not tokens:
        return 1
    return max(1, round(tokens / micro_batch_tokens))


def mean_tokens(split: Split) -> float | None:
    """The mean length of the split's sequences in tokens (None when it has none)."""
    return split.tokens / len(split.sequences) if split.sequences else None


# --- loading -------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as exc:
                    raise DataError(
                        f"{path}:{n} is not JSON: {exc}", hint="prepare the dataset again"
                    ) from None
    return records


def _pretokenized(data_dir: Path, split: str, tokenizer, max_length: int) -> list[Seq] | None:
    """The prepared ids, when they were made by this very tokenizer and fit max_length."""
    manifest_path = data_dir / DATASET_MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        wanted = read_model(DatasetManifest, manifest_path.read_bytes(), str(manifest_path)).tokenizer_fingerprint
    except ProtocolError:
        return None  # tokenize again: the ids may not be what they say
    if not wanted or wanted != tokenize.tokenizer_fingerprint(tokenizer):
        return None
    ids, offsets, mask = tokenize.load_tokenized(data_dir, split)
    lengths = np.diff(offsets)
    if len(lengths) and lengths.max() > max_length:
        return None  # prepared with a longer max_length: tokenize again under this one
    return [Seq(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def adopt_chat_template(data_dir: str | Path, tokenizer) -> None:
    """A tokenizer without a chat template takes the one the records were rendered with (the
    plain format, from dataset.json), so the adapter's tokenizer is saved with it and inference
    prompts the model the way it was trained."""
    if getattr(tokenizer, "chat_template", None):
        return
    path = Path(data_dir) / DATASET_MANIFEST
    template = None
    try:
        template = read_model(DatasetManifest, path.read_bytes(), str(path)).chat_template
    except (OSError, ProtocolError):
        pass  # the worker rendered with the plain format itself (jobs.tokenize): the same template
    tokenizer.chat_template = template or tokenize.PLAIN_TEMPLATE


def load_split(data_dir: str | Path, split: str, tokenizer, max_length: int, overlong: str,
               template_text: bool = False) -> Split:
    """`{data_dir}/{split}.jsonl` as token sequences; an absent or empty file gives an empty Split.

    Re-tokenizing applies data.overlong again: "drop" counts what it drops, "fail" raises.
    """
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        return Split(split)
    sequences = _pretokenized(data_dir, split, tokenizer, max_length)
    if sequences is not None:
        return _trainable(Split(split, sequences, "pre-tokenized"))
    result = Split(split, source="tokenized")
    records = read_records(path)
    for n, enc in enumerate(tokenize.encode_many(tokenizer, records, max_length, overlong, 0, template_text), 1):
        if enc is None and overlong == "fail":
            raise DataError(
                f"{path}: record {n} is longer than data.max_length = {max_length} tokens",
                hint='raise data.max_length, or set data.overlong = "drop" or "truncate"',
            )
        assert not isinstance(enc, tokenize.Refused)  # without refusals=True encode_many raises instead
        if enc is None:
            result.dropped += 1
        else:
            result.sequences.append(Seq(np.asarray(enc.input_ids, np.int64), np.asarray(enc.mask, np.uint8)))
    return _trainable(result)


def _trainable(split: Split) -> Split:
    """Drop sequences that train no token (the first token is never predicted)."""
    kept = [s for s in split.sequences if s.mask[1:].any()]
    split.dropped += len(split.sequences) - len(kept)
    split.sequences = kept
    return split


# --- batching --------------------------------------------------------------------------------


# On CUDA packed rows are filled only up to the next multiple of this, not to the whole micro-batch:
# rows of ~6k tokens in 8k micro-batches wasted a quarter of each step on the filler (docs/benchmarks.md).
# 256 measured a little faster than 1,024 in all three capped cases (module docstring).
PAD_MULTIPLE = 256


def padded_length(tokens: int, pad_to: int, pad_multiple: int = 0) -> int:
    """The length a packed row of `tokens` tokens is filled to: pad_to, or with pad_multiple the next
    multiple of it, at most pad_to; never less than `tokens` (0: no filling)."""
    if not pad_to:
        return tokens
    target = pad_to if not pad_multiple else min(pad_to, -(-tokens // pad_multiple) * pad_multiple)
    return max(tokens, target)


def packed_row(
    seqs: Sequence[Seq], pad_to: int = 0, pad_id: int = 0, varlen: bool = False, pad_multiple: int = 0
) -> dict:
    """Sequences end to end in one row, position_ids restarting at each, labels masked at each start.

    With pad_to, the row is filled by an untrained sequence of pad_id up to pad_to tokens, or with
    pad_multiple up to the next multiple of it (at most pad_to): `padded_length`.
    With varlen, it also carries cu_seq_lens_q/k (int32) and max_length_q/k (int) for flash attention.
    """
    n = sum(len(s.ids) for s in seqs)
    fill = padded_length(n, pad_to, pad_multiple) - n
    if fill:
        seqs = [*seqs, Seq(np.full(fill, pad_id, dtype=np.int64), np.zeros(fill, dtype=np.uint8))]
    ids = np.concatenate([s.ids for s in seqs]).astype(np.int64)
    trained = np.concatenate([s.mask for s in seqs]).astype(bool)
    labels = np.where(trained, ids, IGNORE)
    starts = np.cumsum([0] + [len(s.ids) for s in seqs[:-1]])
    labels[starts] = IGNORE  # nothing is predicted across a boundary
    positions = np.concatenate([np.arange(len(s.ids)) for s in seqs])
    row = {
        "input_ids": torch.from_numpy(ids)[None],
        "labels": torch.from_numpy(labels)[None],
        "position_ids": torch.from_numpy(positions)[None],
    }
    if varlen:
        lengths = [len(s.ids) for s in seqs]
        cu = torch.from_numpy(np.cumsum([0, *lengths]).astype(np.int32))
        row.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return row


def padded_rows(seqs: Sequence[Seq], pad_id: int) -> dict[str, torch.Tensor]:
    """One sequence a row, right-padded to the longest, with attention_mask and -100 labels on pads."""
    width = max(len(s.ids) for s in seqs)
    ids: np.ndarray = np.full((len(seqs), width), pad_id, dtype=np.int64)
    labels: np.ndarray = np.full((len(seqs), width), IGNORE, dtype=np.int64)
    attention: np.ndarray = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        n = len(s.ids)
        ids[row, :n] = s.ids
        labels[row, :n] = np.where(s.mask.astype(bool), s.ids, IGNORE)
        attention[row, :n] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(attention),
    }


def micro_batch(
    seqs: Sequence[Seq], packing: bool, pad_id: int, pad_to: int = 0, varlen: bool = False, pad_multiple: int = 0
) -> dict:
    """One micro-batch of these sequences: a packed row (`packed_row`) or padded rows (`padded_rows`)."""
    if packing:
        return packed_row(seqs, pad_to, pad_id, varlen=varlen, pad_multiple=pad_multiple)
    return padded_rows(seqs, pad_id)


class MicroBatches(torch.utils.data.Dataset):
    """A dataset whose items are whole micro-batches, built when asked for (memory stays flat).

    `varlen` (packed rows: add the flash-attention boundaries) and `extra` (keys added to every
    item, e.g. Liger's skip_logits for evaluation) are set after the model is chosen
    (remote_worker.fast.FastPaths.configure); items are built lazily, so they take effect at once.
    """

    def __init__(
        self,
        sequences: list[Seq],
        micro_batch_tokens: int,
        packing: bool,
        pad_id: int,
        seed: int | None = None,
        pad_to: int = 0,
        multiple: int = 1,
        pad_multiple: int = 0,
        packer: str = DEFAULT_PACKER,
    ):
        self.sequences = sequences
        self.packing = packing
        self.pad_id = pad_id
        self.pad_to = pad_to  # packed rows only: fill each up to this many tokens
        self.pad_multiple = pad_multiple  # ... or only up to the next multiple of this (padded_length)
        self.varlen = False  # packed rows only: add cu_seq_lens_q/k and max_length_q/k
        self.extra: dict = {}  # added to every item as is
        lengths = [len(s.ids) for s in self.sequences]
        self.packer = packer
        self.groups = pack(lengths, micro_batch_tokens, seed, padded=not packing, packer=packer)  # indices
        self.fillers = -len(self.groups) % max(1, multiple)
        self.groups += [[] for _ in range(self.fillers)]  # [] = a filler (see the docstring)
        self.tokens = sum(lengths)  # non-pad tokens in one pass over the data

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seqs = [self.sequences[j] for j in self.groups[i]] or [_filler(self.pad_id)]
        item = micro_batch(seqs, self.packing, self.pad_id, self.pad_to, self.varlen, self.pad_multiple)
        return {**item, **self.extra} if self.extra else item


def _filler(pad_id: int) -> Seq:
    return Seq(np.full(1, pad_id, dtype=np.int64), np.zeros(1, dtype=np.uint8))


def first(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The data collator: the Trainer hands over one item (batch size 1), already a micro-batch."""
    (item,) = items
    return item
