"""`python -m remote_worker.chat`: talk to the tuned model in the terminal, tokens streamed as they come.

Reads one message a line from stdin; `/reset` forgets the conversation, `/exit` (or end of input)
quits. Each turn is rendered with the adapter's chat template and stops at the stop tokens of
training (remote_worker.tuned.stop_ids). `--base` talks to the base model alone (adapter off).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from remote_worker import WorkerError
from remote_worker import tuned as tuned_mod

PROMPT = "you> "
REPLY = "model> "


def chat(adapter: Path, *, base: str | None = None, use_base: bool = False, max_new_tokens: int = 512,
         system: str | None = None, device: str = "auto", stdin=None, stdout=None) -> int:  # fmt: skip
    import contextlib

    import torch
    from transformers import TextStreamer

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    t = tuned_mod.load_tuned(adapter, base, device)
    tok = t.tokenizer
    which = "the base model alone" if use_base else f"the tuned model ({adapter.name} on {t.base})"
    print(f"chatting with {which} on {t.device}; /reset starts over, /exit or Ctrl-D quits", file=stdout, flush=True)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        print(PROMPT, end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            print(file=stdout, flush=True)
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = history[:1] if system else []
            print("(conversation reset)", file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": text})
        enc = tok(tuned_mod.chat_prompt(tok, history), return_tensors="pt", add_special_tokens=False)
        enc = {k: v.to(t.device) for k, v in enc.items()}
        print(REPLY, end="", file=stdout, flush=True)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        off = t.model.disable_adapter() if use_base else contextlib.nullcontext()
        with off, torch.no_grad():
            out = t.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=t.stop_ids,
                pad_token_id=tok.pad_token_id, streamer=streamer,
            )  # fmt: skip
        answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": answer})
        stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m remote_worker.chat", description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--base", default=None, help="where the base model is (default: the adapter's)")
    ap.add_argument("--no-adapter", action="store_true", help="the base model alone")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--system", default=None, help="a system message")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    a = ap.parse_args(argv)
    try:
        return chat(a.adapter, base=a.base, use_base=a.no_adapter, max_new_tokens=a.max_new_tokens,
                    system=a.system, device=a.device)  # fmt: skip
    except WorkerError as exc:
        print(f"failed: {exc}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
