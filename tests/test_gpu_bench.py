"""bench/gpu_bench.py is the one script a lent GPU runs; its --smoke mode walks the same code on CPU, so a
broken script is found here and not in the 15 minutes of device time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, "bench/gpu_bench.py", "--smoke", "--out", str(out),
                             "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 1 and "error" not in runs[0], runs
    run = runs[0]
    assert run["tool"] == "cpt" and run["device"] == "cpu" and run["seq_length"] == 64
    assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1 and run["micro_batch_size"] >= 1
    assert 0 <= run["data_wait_share"] <= 1, run
