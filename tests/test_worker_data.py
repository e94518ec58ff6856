"""remote_worker.data on the tiny Qwen2: packing keeps sequences apart, masks survive, batches fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tinymodel import load_tokenizer, make_model  # noqa: E402

from jobs import packing, tokenize  # noqa: E402
from jobs.layout import DATASET_MANIFEST  # noqa: E402
from jobs.protocol import DatasetManifest, dump_model  # noqa: E402
from jobs.spec import JobSpec, TrainSpec  # noqa: E402
from remote_worker import data, recipe  # noqa: E402
from remote_worker.probe import Probe  # noqa: E402

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Translate to Chinese: hello."},
        {"role": "assistant", "content": "你好。"},
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "answer 0123456789"},
    ],
    [
        {"role": "user", "content": "Write a haiku about GPUs renting by the hour."},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
    ],
]
TEXT = "The quick brown fox jumps over the lazy dog 0123456789."
RECORDS = [{"messages": m} for m in CONVERSATIONS] + [{"text": TEXT}]
CPU = Probe("cpu", "cpu", False, "float32", "sdpa", {})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def sequences(tokenizer):
    encoded = [tokenize.encode(tokenizer, r, 256, "drop") for r in RECORDS]
    return [data.Seq(np.asarray(e.input_ids, np.int64), np.asarray(e.mask, np.uint8)) for e in encoded]


@pytest.fixture(scope="module")
def model(model_dir):
    """The model as the recipe loads it (fp32, SDPA, use_cache off), in train mode (dropout is 0)."""
    spec = JobSpec.model_validate(
        {
            "name": "t",
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": "x"},
            "quant": {"bits": 16},
        }
    )
    m = recipe.load_model(str(model_dir), spec, CPU)
    assert m.config._attn_implementation == "sdpa"
    return m.train()


def _per_sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and count of predicted tokens, for one row."""
    losses = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")
    return losses, (labels[1:] != -100)


def test_packed_loss_equals_unpacked(model, sequences):
    batch = data.packed_row(sequences)
    # no attention_mask: transformers builds the block-diagonal mask from position_ids
    assert batch.keys() == {"input_ids", "labels", "position_ids"}
    with torch.no_grad():
        packed = model(**batch)
        unpacked = [model(**data.packed_row([s])) for s in sequences]

    start = 0
    total_sum, total_n = 0.0, 0
    for seq, alone in zip(sequences, unpacked, strict=True):
        end = start + len(seq.ids)
        labels = batch["labels"][0, start:end]
        losses, trained = _per_sequence_losses(packed.logits[0, start:end], labels)
        ref_losses, ref_trained = _per_sequence_losses(alone.logits[0], data.packed_row([seq])["labels"][0])
        assert torch.equal(trained, ref_trained)
        mean = losses[trained].mean()
        assert abs(mean.item() - alone.loss.item()) < 1e-4
        assert torch.allclose(losses[trained], ref_losses[ref_trained], atol=1e-4)
        total_sum += losses[trained].sum().item()
        total_n += int(trained.sum())
        start = end
    # and the packed row's own loss is the token-weighted mean of the sequences' losses
    assert abs(packed.loss.item() - total_sum / total_n) < 1e-4


def test_filling_a_row_to_a_constant_length_changes_no_loss(model, sequences):
    plain = data.packed_row(sequences)
    n = plain["input_ids"].shape[1]
    filled = data.packed_row(sequences, pad_to=n + 37, pad_id=0)
    assert filled["input_ids"].shape == (1, n + 37)
    assert (filled["labels"][0, n:] == -100).all() and (filled["input_ids"][0, n:] == 0).all()
    assert filled["position_ids"][0, n:].tolist() == list(range(37))  # a sequence of its own
    with torch.no_grad():
        a, b = model(**plain), model(**filled)
    assert abs(a.loss.item() - b.loss.item()) < 1e-5
    assert torch.allclose(a.logits[0], b.logits[0, :n], atol=1e-5)
    assert data.packed_row(sequences, pad_to=n - 1)["input_ids"].shape == (1, n)  # never cut


def test_a_pad_multiple_fills_a_row_only_to_the_next_multiple(model, sequences):
    n = data.packed_row(sequences)["input_ids"].shape[1]
    budget = n + 300
    row = data.packed_row(sequences, pad_to=budget, pad_id=0, pad_multiple=64)
    assert row["input_ids"].shape[1] == -(-n // 64) * 64 < budget  # not the whole micro-batch
    assert (row["labels"][0, n:] == -100).all()
    with torch.no_grad():
        assert abs(model(**row).loss.item() - model(**data.packed_row(sequences)).loss.item()) < 1e-5
    assert data.padded_length(n, budget, 10_000) == budget  # a multiple past the micro-batch: the micro-batch
    assert data.padded_length(budget + 5, budget, 64) == budget + 5  # never cut
    assert data.padded_length(n, 0, 64) == n  # no pad_to: no filling
    mb = data.MicroBatches(sequences, budget, True, 0, pad_to=budget, pad_multiple=64)
    assert all(mb[i]["input_ids"].shape[1] % 64 == 0 for i in range(len(mb)))


def test_the_comparison_catches_sequences_that_attend_to_each_other(model, sequences):
    """With a KV cache (the config default, which the recipe turns off) transformers 5 skips the
    packed-sequence mask, and later sequences see earlier ones: the check above would fail."""
    batch = data.packed_row(sequences)
    with torch.no_grad():
        mixed = model(**batch, use_cache=True)
        alone = model(**data.packed_row([sequences[1]]))
    n0, n1 = len(sequences[0].ids), len(sequences[1].ids)
    assert not torch.allclose(mixed.logits[0, n0 : n0 + n1], alone.logits[0], atol=1e-3)


def test_padded_rows_give_the_same_losses(model, sequences):
    batch = data.padded_rows(sequences, pad_id=0)
    with torch.no_grad():
        padded = model(**batch)
        for row, seq in enumerate(sequences):
            alone = model(**data.packed_row([seq]))
            n = len(seq.ids)
            losses, trained = _per_sequence_losses(padded.logits[row, :n], batch["labels"][row, :n])
            assert abs(losses[trained].mean().item() - alone.loss.item()) < 1e-4


def test_labels_are_exactly_the_assistant_tokens(tokenizer, sequences):
    batch = data.packed_row(sequences)
    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert starts == list(np.cumsum([0] + [len(s.ids) for s in sequences[:-1]]))
    assert all(labels[s] == -100 for s in starts)  # nothing predicted across a boundary
    bounds = starts + [len(ids)]
    for k, record in enumerate(RECORDS):
        a, b = bounds[k], bounds[k + 1]
        trained = (labels[a:b] != -100).tolist()
        assert torch.equal(labels[a:b][labels[a:b] != -100], ids[a:b][labels[a:b] != -100])
        runs, current = [], []
        for i, t in zip(range(a, b), trained, strict=True):
            if t:
                current.append(int(ids[i]))
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        decoded = [tokenizer.decode(run) for run in runs]
        if "messages" in record:
            expected = [m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant"]
            assert decoded == expected
        else:  # a text record: every token but the boundary one, then EOS
            assert decoded == [tokenizer.decode(ids[a + 1 : b].tolist())]
            assert ids[b - 1] == tokenizer.eos_token_id


def test_group_respects_the_budget():
    assert packing.next_fit([3, 4, 2, 9, 1], budget=8) == [[0, 1], [2], [3], [4]]
    assert packing.next_fit([3, 4, 1], budget=7) == [[0, 1], [2]]
    # padded: rows x longest row
    assert packing.next_fit([2, 2, 3, 1], budget=6, padded=True) == [[0, 1], [2, 3]]
    assert packing.next_fit([2, 2, 4], budget=6, padded=True) == [[0, 1], [2]]
    assert packing.next_fit([], budget=8) == []


def test_micro_batches_are_deterministic_and_cover_everything(sequences):
    a = data.MicroBatches(sequences * 5, 64, packing=True, pad_id=0, seed=7)
    b = data.MicroBatches(sequences * 5, 64, packing=True, pad_id=0, seed=7)
    c = data.MicroBatches(sequences * 5, 64, packing=True, pad_id=0, seed=8)
    assert a.groups == b.groups
    assert a.groups != c.groups  # the seed decides the make-up
    assert sorted(i for g in a.groups for i in g) == list(range(20))
    assert sum(a[i]["input_ids"].numel() for i in range(len(a))) == a.tokens
    longest = max(len(s.ids) for s in sequences)
    assert all(a[i]["input_ids"].numel() <= max(64, longest) for i in range(len(a)))
    assert data.first([a[0]]) is not None


def test_batch_shape_defaults():
    assert data.batch_shape(TrainSpec(), 2048, "cuda") == (16384, 1)
    assert data.batch_shape(TrainSpec(), 32768, "cuda") == (32768, 1)
    assert data.batch_shape(TrainSpec(), 2048, "cpu") == (2048, 1)
    four_k = TrainSpec(micro_batch_tokens=4096, global_batch_tokens=16384)
    assert data.batch_shape(four_k, 2048, "cuda") == (4096, 4)
    rounded_up = TrainSpec(micro_batch_tokens=4096, global_batch_tokens=1000)
    assert data.batch_shape(rounded_up, 2048, "cpu") == (4096, 1)


def _write_split(tmp_path, records):
    with open(tmp_path / "train.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def test_pretokenized_ids_are_used_only_for_the_same_tokenizer(tmp_path, tokenizer, sequences):
    _write_split(tmp_path, RECORDS)
    tokenize.write_tokenized(tmp_path, "train", (tokenize.encode(tokenizer, r, 256, "drop") for r in RECORDS))
    manifest = DatasetManifest(
        format_version=1, digest="d", tokenizer_fingerprint=tokenize.tokenizer_fingerprint(tokenizer)
    )
    (tmp_path / DATASET_MANIFEST).write_text(dump_model(manifest))

    pre = data.load_split(tmp_path, "train", tokenizer, 256, "drop")
    assert pre.source == "pre-tokenized"
    assert [s.ids.tolist() for s in pre.sequences] == [s.ids.tolist() for s in sequences]
    assert [s.mask.tolist() for s in pre.sequences] == [s.mask.tolist() for s in sequences]

    manifest.tokenizer_fingerprint = "another tokenizer"
    (tmp_path / DATASET_MANIFEST).write_text(dump_model(manifest))
    again = data.load_split(tmp_path, "train", tokenizer, 256, "drop")
    assert again.source == "tokenized"
    assert [s.ids.tolist() for s in again.sequences] == [s.ids.tolist() for s in sequences]

    assert data.load_split(tmp_path, "eval", tokenizer, 256, "drop").sequences == []


def test_overlong_records_are_dropped_or_fail(tmp_path, tokenizer):
    from remote_worker import DataError

    _write_split(tmp_path, RECORDS)
    split = data.load_split(tmp_path, "train", tokenizer, 24, "drop")
    assert split.dropped >= 1 and all(len(s.ids) <= 24 for s in split.sequences)
    with pytest.raises(DataError, match="longer than data.max_length"):
        data.load_split(tmp_path, "train", tokenizer, 24, "fail")
