"""Dataset preparation on the laptop: read, check, measure, and make ready to pack.

    readers   jsonl / json array / csv / parquet rows, streaming
    formats   alpaca, sharegpt, messages, prompt_completion, text -> canonical records
    validate  field and conversation checks (file:line, field, reason)
    scan      pass one: read + validate + normalize + dedupe
    prepare   the pipeline: split, tokenize, overlong, content-addressed output
    stats     percentiles and packing efficiency
    tokens    finding the model's tokenizer on the laptop (never a download)

The rendering of the report and of `--show N` examples is client.views.dataset.
"""

from client.dataset.prepare import Prepared, check, prepare

__all__ = ["Prepared", "check", "prepare"]
