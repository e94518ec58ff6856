"""The fast GGUF path: parallel quantization is the library's, byte for byte; the header parser reads what
gguf.GGUFReader reads; the read-back check catches a damaged file; a K-quant name says what to do."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from remote_worker import export, gguf_io  # noqa: E402
from tests.tinymodel import make_tokenizer, tiny_causal_lm  # noqa: E402

T = gguf.GGMLQuantizationType


def _qwen(tmp_path):
    from transformers import Qwen2Config

    tok = make_tokenizer(tmp_path / "tok")
    return tiny_causal_lm(Qwen2Config, tok), tok


@pytest.mark.parametrize("qt", [T.Q8_0, T.Q5_0, T.Q4_0, T.BF16, T.F16, T.F32])
def test_row_chunks_quantized_in_threads_are_the_library_s_bytes(qt):
    rows = np.random.default_rng(0).standard_normal((3 * gguf_io.ROWS_PER_TASK + 7, 96)).astype(np.float32)
    whole = gguf.quants.quantize(rows, qt)
    with ThreadPoolExecutor(4) as pool:
        chunked = gguf_io.over_rows(gguf_io.encoder(qt), rows, pool)
    assert chunked.dtype == whole.dtype and chunked.tobytes() == whole.tobytes()
    assert chunked.nbytes == gguf_io.nbytes(rows.shape, qt)


def test_the_header_parser_reads_what_gguf_reader_reads_and_f32_comes_back_exact(tmp_path):
    model, tok = _qwen(tmp_path)
    path = tmp_path / "m.gguf"
    export.write_gguf(model, tok, path, "f32", [tok.eos_token_id])
    layout = gguf_io.Layout(path)
    reader = gguf.GGUFReader(str(path))
    assert [(n, s, q, layout.data_start + o) for n, s, q, o in layout.tensors] == [
        (t.name, tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type), int(t.data_offset)) for t in reader.tensors
    ]
    assert layout.kv["general.architecture"] == "qwen2" and layout.kv["tokenizer.ggml.tokens"] == len(tok)
    back = dict(gguf_io.read_tensors(path))
    assert np.array_equal(back["blk.1.ffn_down.weight"], model.model.layers[1].mlp.down_proj.weight.detach().numpy())


def test_the_read_back_check_passes_a_good_file_and_fails_a_damaged_one(tmp_path):
    model, tok = _qwen(tmp_path)
    inputs, _ = export.check_inputs(tok, "cpu")
    reference = export.logits_of(model, inputs)
    path = tmp_path / "m.gguf"
    export.write_gguf(model, tok, path, "q8_0", [tok.eos_token_id])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert export.check_gguf(path, model, tok, reference, "q8_0").passed

    layout = gguf_io.Layout(path)
    name, shape, qt, offset = next(t for t in layout.tensors if t[0] == "blk.0.ffn_down.weight")
    with open(path, "r+b") as f:  # the tensor's q8_0 blocks zeroed: scale 0, every weight 0
        f.seek(layout.data_start + offset)
        f.write(bytes(gguf_io.nbytes(shape, T(qt))))
    model.load_state_dict(state)
    check = export.check_gguf(path, model, tok, reference, "q8_0")
    assert not check.passed and check.rel_l2 > export.GGUF_REL_TOL["q8_0"]
    assert check.weight_tensor == "model.layers.0.mlp.down_proj.weight" and check.weight_rel_l2 == pytest.approx(1.0)


def test_in_16_bit_compute_the_weights_decide(tmp_path):
    """A bf16 model read back from f16: the weights are exact, the logits carry bf16's own error."""
    model, tok = _qwen(tmp_path)
    model = model.to(torch.bfloat16)
    inputs, _ = export.check_inputs(tok, "cpu")
    reference = export.logits_of(model, inputs)
    path = tmp_path / "m.gguf"
    export.write_gguf(model, tok, path, "f16", [tok.eos_token_id])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    good = export.check_gguf(path, model, tok, reference + 1.0, "f16")  # the logits far off: not decisive
    assert good.passed and good.weight_rel_l2 < 1e-6
    model.load_state_dict(state)
    layout = gguf_io.Layout(path)
    name, shape, qt, offset = next(t for t in layout.tensors if t[0] == "blk.1.attn_q.weight")
    with open(path, "r+b") as f:
        f.seek(layout.data_start + offset)
        f.write(bytes(gguf_io.nbytes(shape, T(qt))))
    bad = export.check_gguf(path, model, tok, reference, "f16")
    assert not bad.passed and bad.weight_tensor == "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("name", ["q4_k_m", "Q6_K", "q3_k", "iq4_xs"])
def test_a_k_quant_is_refused_with_what_to_do_instead(name):
    from client.errors import SpecError
    from client.lifecycle.export import task_of

    with pytest.raises(SpecError) as e:
        task_of("gguf", name)
    assert "unknown GGUF type" in str(e.value) and "llama-quantize model-f16.gguf" in e.value.hint
    assert not hasattr(gguf.quants, "Q4_K") or not hasattr(gguf.quants.Q4_K, "quantize_blocks") or (
        gguf.quants.Q4_K.quantize_blocks.__qualname__.startswith("__Quant")
    )  # gguf 0.19 has no K-quant quantizer: if a release adds one, expose it and drop this refusal
