"""bench/e2e.py, the GPU lease's end-to-end check (bench/gpu.sh, call 1), at tiny scale on the CPU: so that it
cannot rot between leases. Every stage runs as a user runs it, and records its time and peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_end_to_end_check_runs_every_stage_at_tiny_scale(tmp_path):
    out = tmp_path / "e2e.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "e2e.py"), "--preset", "tiny", "--work",
                           str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "partial" not in result  # the whole result replaced the partial ones
    assert result["ok"] and result["transformers_reload"] == "ok" and result["eval_has_p_first"], result
    for name in ("iterate", "train text (torchrun)", "train lora (torchrun)", "judge"):
        row = result["commands"][name]
        assert row["code"] == 0 and row["seconds"] > 0 and row["rss_peak_mb"] > 0, (name, row)
    for name in ("train text (torchrun)", "train lora (torchrun)"):  # FSDP2 at world size 1
        assert result["commands"][name]["sharded_ranks"] == 1, result["commands"][name]
    stages = result["loop_stages"]
    assert set(stages["seconds"]) >= {"synth", "filter", "train", "eval"}
    assert all(stages["peak_mb"][name]["rss"] > 0 for name in ("synth", "filter", "train", "eval"))
    assert (tmp_path / "work" / "judged" / "judgments.jsonl").is_file()
