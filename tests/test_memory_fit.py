"""bench/memory_fit.py --fit: the fit recovers the constants that made its rows, and says which cases it gets
wrong (CPU, offline: rows written by jobs.memory itself with known constants)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import memory_fit  # noqa: E402

from jobs import memory  # noqa: E402

TRUE = replace(memory.DEFAULT, act_h=6.0, act_kv=2.5, act_i=3.5, ckpt_h=1.2, transient_layers=1.0,
               efficiency=0.42, recompute_cost=1.3, bw_efficiency=0.2, attn_cost=1.6, token_h=40.0)  # fmt: skip


def synthetic_rows() -> list[dict]:
    rows = []
    for arch_name, kind, seq in (("0.5b", "short", 250), ("7b", "short", 250), ("7b", "long", 6000),
                                 ("14b", "short", 250)):  # fmt: skip
        row = {"arch": arch_name, "rows": kind, "bits": 4, "fused_loss": True, "mean_seq": seq}
        a, s = memory_fit.arch_for(row), memory_fit.setup_for(row)
        for t in (4096, 8192, 16384):
            for k in (0, a.layers // 4, a.layers // 2, a.layers):
                shape = memory.Shape(t, k)
                peak = memory.estimate(a, s, shape, TRUE).allocated / 1e9
                tps = memory.tokens_per_s(a, s, shape, 989, 4.8e12, TRUE)
                rows.append({**row, "kind": "grid", "tokens": t, "checkpointed": k, "real_tokens": t,
                             "peak_gb": peak, "seconds": t / tps, "tokens_per_s": round(tps)})  # fmt: skip
    return rows


def test_the_fit_recovers_the_constants_behind_the_rows(tmp_path: Path, capsys) -> None:
    rows = synthetic_rows()
    fitted = memory_fit.fit(rows)
    for name in ("act_h", "act_kv", "act_i", "ckpt_h", "efficiency", "recompute_cost", "bw_efficiency", "attn_cost",
                 "token_h"):
        assert abs(getattr(fitted, name) - getattr(TRUE, name)) <= 0.05 * getattr(TRUE, name), name
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "constants.json"
    assert memory_fit.main(["--fit", str(tmp_path), "--write", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "worst peak error 0%" in printed and "wrong in 0 case(s)" in printed
    assert memory.with_constants(json.loads(out.read_text())).act_i == fitted.act_i


def test_the_report_names_a_case_the_model_gets_wrong() -> None:
    row = {"kind": "grid", "arch": "7b", "rows": "short", "tokens": 8192, "checkpointed": 0, "peak_gb": 30.0,
           "seconds": 1.0, "tokens_per_s": 8192, "real_tokens": 8192}  # fmt: skip
    lines = memory_fit.report([row], memory.DEFAULT)  # predicted ~44 GB: "does not fit 40", measured fits
    assert any("7b short 8192/0 at 40 GB" in line for line in lines)


def test_the_shipped_constants_meet_the_targets_on_the_measured_rows() -> None:
    """jobs.memory.Constants against the committed H200 rows: peaks within 10%, tokens/s within 20%, and
    fits/does-not-fit as the calibration decides it (peak <= cap - its headroom) in every case and cap."""
    rows = memory_fit.read_rows([str(BENCH / "results" / "2026-11-30_h200_memory-fit.jsonl")])
    measured = [r for r in memory_fit.grid_rows(rows) if r.get("peak_gb")]
    assert len(measured) >= 30
    for r in measured:
        peak, speed = memory_fit.predict_row(r, memory.DEFAULT)
        assert abs(peak - r["peak_gb"]) <= 0.10 * r["peak_gb"], r
        assert abs(speed - r["tokens_per_s"]) <= 0.20 * r["tokens_per_s"], r
        assert memory_fit.fits_wrong(r, memory.DEFAULT) == [], r
    # 7B, 16,384 tokens, 14 layers: 47.97 GB measured, inside a 48 GB card's headroom: fits on neither side
    edge = next(r for r in measured if (r["arch"], r["tokens"], r["checkpointed"]) == ("7b", 16384, 14))
    assert edge["peak_gb"] > memory_fit.usable_gb(48)
