"""Tied input and output embeddings (Qwen2.5-0.5B's tie_word_embeddings = True), and the memory bench's rows.

The bench's 0.5b architecture failed every case on the GPU (2026-11-30) with "vectorized gather kernel index
out of bounds": its rows drew token ids up to 151,998, past the 0.5B's vocab of 151,936 (the 7B's 152,064
hid it). A tied model itself trains in the worker, with the paths that run on the CPU (fused LoRA,
checkpointing), and its embedding stays the lm_head's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from jobfiles import run_in_process  # noqa: E402
from test_worker_fast import spec_for  # noqa: E402
from tinymodel import make_tokenizer  # noqa: E402

from jobs import events as ev  # noqa: E402
from jobs.spec import WorkerJob  # noqa: E402


@pytest.mark.parametrize("arch", ["0.5b", "7b", "14b"])
def test_the_bench_rows_stay_inside_the_vocabulary(arch):
    import memory_fit

    a = memory_fit.arch_for({"arch": arch})
    for kind in ("short", "long"):
        _, gen = memory_fit.row_lengths(kind, False, a.vocab)
        ids = torch.cat(gen(20000, 0))
        assert int(ids.max()) < a.vocab and int(ids.min()) >= 0, (arch, kind)


def tied_model(out: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = make_tokenizer(out)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(out)
    return out


def test_a_tied_embedding_model_trains_in_the_worker(tmp_path):
    model_dir = tied_model(tmp_path / "tied")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    records = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer " * i}]}
               for i in range(1, 9)]  # fmt: skip
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = spec_for(model_dir, max_steps=4, micro_batch_tokens=96, save_every_minutes=0, learning_rate=1e-2,
                    gradient_checkpointing="on")  # fmt: skip
    job = WorkerJob(job_id="tied", spec=spec, data_dir=str(data_dir), job_dir=str(tmp_path / "job"))
    run_in_process(job)
    events = [ev.parse(x) for x in (Path(job.job_dir) / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e.type == "started")
    assert started.model_extra["fused_lora"].startswith("on") and started.gradient_checkpointing
    losses = [e.loss for e in events if e.type == "step"]
    assert len(losses) == 4 and all(x == x and x < 100 for x in losses)
    assert any(e.type == "done" for e in events), [e.type for e in events]
