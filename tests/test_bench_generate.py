"""benchmarks/bench_generate.py runs on CPU (its --smoke mode: the same code on a tiny model)
and writes the markdown table and JSON it promises, with the targets checked."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_generate_smoke_writes_table(tmp_path):
    out = tmp_path / "generate_cpu.md"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_generate.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "torch " in text and "transformers " in text and "date:" in text
    rows = [line for line in text.splitlines() if line.startswith("| 512 ") or line.startswith("| 1024 ")]
    assert len(rows) == 4  # two contexts x ratios 4 and 1
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] in ("4", "1")
        assert cells[7].endswith("x") and cells[9].endswith("x")  # prefill and decode speed-ups
    data = json.loads((tmp_path / "generate_cpu.json").read_text())
    for row in data["rows"]:
        o, b = row["unigist"], row["baseline"]
        assert o["new_tokens"] == b["new_tokens"] == 8
        assert o["decode_tok_s"] > 0 and b["decode_tok_s"] > 0
        # the compressed cache holds at most sinks + gists + window plus the last forward's rows
        assert o["cache_length"] <= o["max_allowed_length"] + 2
        if row["ratio"] == 4:
            assert o["kv_bytes"] < b["kv_bytes"]
    assert "## Targets" in text and "## Ratio-1 decoding" in text
    assert [x["model"] for x in data["r1"]] == ["smoke", "smoke"]
