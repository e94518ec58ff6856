"""After training, on the tiny model trained for real on one fact: merge, GGUF, Ollama, eval, the snippet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tinyadapter import ANSWER, QUESTION, train_fact

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fact(tmp_path_factory) -> tuple[Path, Path]:
    return train_fact(tmp_path_factory.mktemp("fact"))


def _logits(model, tok, texts=("What is the capital of France?", "hello 你好")):
    enc = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return out[enc["attention_mask"].bool()]


def _peft_and_base(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from remote_worker.tuned import load_tokenizer

    tok = load_tokenizer(adapter)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    peft.eval()
    want = _logits(peft, tok)
    with peft.disable_adapter():
        plain = _logits(peft, tok)
    return tok, want, plain


def test_the_merged_model_loads_without_peft_and_gives_peft_s_logits(fact, tmp_path):
    from transformers import AutoModelForCausalLM

    from jobs.manifest import verify_manifest
    from remote_worker import export

    base, adapter = fact
    rec = export.export(adapter, tmp_path / "merged", "merged", device="cpu")
    verify_manifest(tmp_path / "merged")
    assert rec.merge_check.passed and rec.merged_onto == "16-bit base"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)  # no peft involved
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok, want, plain = _peft_and_base(base, adapter)
    got = _logits(merged, tok)
    assert (got - want).abs().max().item() < 1e-3  # the stated fp32 tolerance (export.MERGE_ATOL)
    assert (want - plain).abs().max().item() > 0.1  # ... and the adapter really moves them


def test_a_merge_that_lost_the_lora_fails_its_check_and_writes_nothing(fact, tmp_path):
    from remote_worker import export

    _, adapter = fact
    with pytest.raises(export.ExportError, match="lost or damaged the LoRA"):
        export.export(adapter, tmp_path / "merged", "merged", device="cpu", corrupt=True)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.tmp").exists()


@pytest.mark.parametrize("qtype", ["q8_0", "f16"])
def test_the_gguf_file_read_back_gives_the_merged_logits_within_its_tolerance(fact, tmp_path, qtype):
    import gguf
    from transformers import AutoModelForCausalLM

    from remote_worker import export

    base, adapter = fact
    rec = export.export(adapter, tmp_path / "g", "gguf", qtype, device="cpu")
    path = tmp_path / "g" / f"model-{qtype}.gguf"
    assert rec.gguf_check.passed and rec.files == [path.name]
    # Independently of the export's own check: the file's metadata, then its logits through transformers.
    reader = gguf.GGUFReader(str(path))
    tok, want, _ = _peft_and_base(base, adapter)

    def field(key):
        f = reader.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert field("tokenizer.chat_template") == tok.chat_template
    assert field("tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    assert field("general.architecture") == "qwen2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == qtype.upper()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    got = _logits(model, tok)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < export.GGUF_REL_TOL[qtype], rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_a_llama_gguf_is_written_in_llama_cpp_s_layout(tmp_path):
    """Llama's Q/K rows are permuted for llama.cpp; transformers undoes it on load: f32 comes back exact."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from remote_worker import export
    from tests.tinymodel import make_tokenizer, tiny_causal_lm

    tok = make_tokenizer(tmp_path / "tok")
    model = tiny_causal_lm(LlamaConfig, tok)
    export.write_gguf(model, tok, tmp_path / "m.gguf", "f32", [tok.eos_token_id])
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    assert (_logits(back, tok) - _logits(model, tok)).abs().max().item() < 1e-4


def test_ollama_gets_the_gguf_and_a_modelfile_with_the_template_and_stops(fact, tmp_path):
    from remote_worker import export

    _, adapter = fact
    rec = export.export(adapter, tmp_path / "o", "ollama", "q8_0", device="cpu")
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert "Modelfile" in rec.files and "model-q8_0.gguf" in rec.files
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>" in text
    assert 'SYSTEM """You are a helpful assistant."""' in text  # the template's default system message
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_eval_writes_base_and_tuned_side_by_side(fact, tmp_path):
    from jobs.manifest import verify_manifest
    from remote_worker import evaluate

    _, adapter = fact
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": QUESTION, "reference": ANSWER}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "你好。"}]}) + "\n"
    )  # fmt: skip
    r = evaluate.evaluate(adapter, tmp_path / "eval", prompts=prompts, max_new_tokens=16, device="cpu")
    verify_manifest(tmp_path / "eval")
    first = r.samples[0]
    assert first.tuned == ANSWER and first.base != ANSWER  # both columns, and they differ where training did
    assert r.tuned.exact_match == 0.5 and r.base.exact_match == 0.0
    assert r.tuned.rouge_l > r.base.rouge_l and r.tuned.loss < r.base.loss
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| prompt | reference | base | tuned |" in md and ANSWER in md
    assert evaluate._Tokens().tokenize("你好, Paris") == ["你", "好", "paris"]  # CJK scored, not dropped


def test_the_snippet_fetch_prints_works_as_printed(fact, tmp_path):
    from client.lifecycle.fetch import load_snippet

    base, adapter = fact
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    os.symlink(base, home / "models" / "tiny")
    cfg = adapter / "adapter_config.json"
    saved = cfg.read_text()
    try:
        cfg.write_text(json.dumps({**json.loads(saved), "base_model_name_or_path": "~/models/tiny"}))
        env = {**os.environ, "HOME": str(home)}
        code = subprocess.run([sys.executable, "-c", "from client.lifecycle.fetch import load_snippet as s; import sys;"
                               f"print(s(__import__('pathlib').Path({str(adapter)!r}), 'unused'))"],
                              env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "~" not in code
        res = subprocess.run([sys.executable, "-c", code + "\nprint(type(model).__name__, tokenizer.eos_token)"],
                             env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.split()[-2:] == ["PeftModelForCausalLM", "<|im_end|>"]
    finally:
        cfg.write_text(saved)
    note = load_snippet(adapter, "x")
    assert note.startswith("from peft")  # the fixture's base exists here: no comment


def test_a_checkpoint_s_adapter_names_a_base_the_laptop_resolves(tmp_path):
    from jobs.protocol import BaseModelRecord
    from remote_worker import checkpoints

    snap = "/root/autodl-tmp/autodl-run/hf/hub/models--Qwen--Qwen2.5-7B-Instruct/snapshots/0123abcd"
    d = tmp_path / "checkpoint-5"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": snap, "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(b"w")
    done = checkpoints.finalize(d, 5)
    for folder in (done.path, done.adapter_path):
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "Qwen/Qwen2.5-7B-Instruct"
        rec = BaseModelRecord.model_validate_json((folder / "base_model.json").read_text())
        assert (rec.name, rec.instance_path) == ("Qwen/Qwen2.5-7B-Instruct", snap)
    assert checkpoints.portable_name("/root/autodl-tmp/Qwen/Qwen2___5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert checkpoints.portable_name("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_a_qlora_adapter_merged_onto_16_bit_still_answers_and_the_nf4_gap_is_measured(tmp_path):
    """docs/export.md's numbers: onto nf4 reproduces training; onto 16-bit differs by the base's nf4 error."""
    pytest.importorskip("bitsandbytes")
    from remote_worker import export, tuned

    _, adapter = train_fact(tmp_path, nf4=True)
    gap = export.nf4_gap(adapter)
    assert gap["merged_nf4_vs_trained"] < 1e-4
    assert 1e-3 < gap["merged_16bit_vs_trained"] < 0.5 * gap["adapter_effect_16bit"]
    t = tuned.load_tuned(adapter, device="cpu")
    merged = t.model.merge_and_unload()
    enc = t.tokenizer(tuned.chat_prompt(t.tokenizer, [{"role": "user", "content": QUESTION}]), return_tensors="pt")
    out = merged.generate(**enc, max_new_tokens=20, do_sample=False, eos_token_id=t.stop_ids)
    assert t.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() == ANSWER
