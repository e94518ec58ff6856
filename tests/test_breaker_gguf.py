"""Breaker: the GGUF read-back check must fail a file whose tensor reads back as NaN (a NaN's relative
error compares False with everything, so it was never the worst tensor and a 16-bit model passed)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from remote_worker import export, gguf_io  # noqa: E402
from tests.test_gguf_io import _qwen  # noqa: E402

T = gguf.GGMLQuantizationType


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_tensor_read_back_as_nan_fails_the_check(tmp_path, dtype):
    model, tok = _qwen(tmp_path)
    model = model.to(dtype)
    inputs, _ = export.check_inputs(tok, "cpu")
    reference = export.logits_of(model, inputs)
    path = tmp_path / "m.gguf"
    export.write_gguf(model, tok, path, "f16", [tok.eos_token_id])
    layout = gguf_io.Layout(path)
    name, shape, qt, offset = next(t for t in layout.tensors if t[0] == "blk.1.attn_q.weight")
    with open(path, "r+b") as f:  # every f16 element 0x7e00: NaN
        f.seek(layout.data_start + offset)
        f.write(b"\x00\x7e" * (gguf_io.nbytes(shape, T(qt)) // 2))
    bad = export.check_gguf(path, model, tok, reference, "f16")
    assert not bad.passed
    assert bad.weight_tensor == "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("keep", [0.5, 0.99, 1000, 10])
def test_a_short_gguf_file_is_an_export_error_not_a_traceback(tmp_path, keep):
    """A GGUF cut short (a full disk) failed the read-back with numpy's reshape ValueError or struct.error,
    which the export's main does not catch: a traceback instead of `failed: ...` with a hint."""
    import os

    model, tok = _qwen(tmp_path)
    inputs, _ = export.check_inputs(tok, "cpu")
    reference = export.logits_of(model, inputs)
    path = tmp_path / "m.gguf"
    export.write_gguf(model, tok, path, "f16", [tok.eos_token_id])
    size = path.stat().st_size
    os.truncate(path, int(size * keep) if keep < 1 else keep)
    with pytest.raises(export.ExportError, match="m.gguf cannot be read back as GGUF") as e:
        export.check_gguf(path, model, tok, reference, "f16")
    assert "df -h" in e.value.hint
