"""bench/gpu_bench.py is the one script a lent GPU runs; its --smoke mode walks the same code on CPU, so a
broken script is found here and not in the 15 minutes of device time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_bench_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, "bench/gpu_bench.py", "--smoke", "--out", str(out),
                             "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and not any("error" in run for run in runs), runs
    run, with_metadata = runs
    assert run["tool"] == "cpt" and run["device"] == "cpu" and run["seq_length"] == 64
    assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1 and run["micro_batch_size"] >= 1
    assert 0 <= run["data_wait_share"] <= 1, run
    assert run["mfu_formula"].startswith("mfu = real_tokens_per_s") and run["peak_bf16_tflops"] > 0
    assert 1 <= run["mean_attention_len"] <= 64 and run["unpadded"] is False
    # The unpadded path (CPU: reference kernel) fed the loader's metadata, as the device run measures it.
    assert with_metadata["unpadded"] is True and with_metadata["loader_metadata"] is True
    assert with_metadata["tokens_per_s"] > 0 and with_metadata["micro_batch_size"] >= 1


def _gpu_bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_bench
    finally:
        sys.path.remove(str(REPO / "bench"))
    return gpu_bench


def test_mfu_counts_attention_per_sequence():
    """MFU = tokens/s x (6 N + 12 L h sum(len^2)/sum(len)) / peak: attention grows with each sequence's own length."""
    gpu_bench = _gpu_bench()
    layers, hidden, params = 24, 1024, 302_000_000
    # Full blocks of 512: the reference script's 6 N + 12 L h seq.
    full = gpu_bench.flops_per_token(layers, hidden, 512, params)
    assert full == 6 * params + 12 * layers * hidden * 512
    assert gpu_bench.mfu(1000.0, layers, hidden, params, 4 * 512**2, 4 * 512, 989e12) == 1000.0 * full / 989e12
    # Lengths 100 and 500: 600 real tokens; attention per token (100^2 + 500^2) / 600 = 433.3, not 512 or 300.
    got = gpu_bench.mfu(600.0, layers, hidden, params, 100**2 + 500**2, 600, 1e15)
    want = 600.0 * (6 * params + 12 * layers * hidden * (100**2 + 500**2) / 600) / 1e15
    assert abs(got - want) < 1e-12
    assert "sum(len^2) / sum(len)" in gpu_bench.MFU_FORMULA


def test_peak_is_picked_by_device_name():
    gpu_bench = _gpu_bench()
    assert gpu_bench.peak_bf16_flops("NVIDIA H100 80GB HBM3") == ("H100", 989e12)
    assert gpu_bench.peak_bf16_flops("NVIDIA H200") == ("H200", 989e12)
    assert gpu_bench.peak_bf16_flops("NVIDIA H100 NVL") == ("H100 NVL", 835e12)
    assert gpu_bench.peak_bf16_flops("NVIDIA H200 NVL") == ("H200 NVL", 835e12)
    assert gpu_bench.peak_bf16_flops("NVIDIA H100 PCIe") == ("H100 PCIe", 756e12)
    assert gpu_bench.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == ("A100", 312e12)
    part, flops = gpu_bench.peak_bf16_flops("NVIDIA L4")
    assert "assumed" in part and flops == 989e12


def test_the_device_run_covers_the_cuda_tests():
    """Every CUDA-only test of the suite is in the list gpu_bench runs on the device, and each listed path exists."""
    import re

    gpu_bench = _gpu_bench()
    listed = " ".join(gpu_bench.CUDA_TESTS)
    for path in (REPO / "tests").rglob("test_*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"skipif\(not torch\.cuda\.is_available\(\)", text):
            assert str(path.relative_to(REPO)) in listed, path.name
    for entry in gpu_bench.CUDA_TESTS:
        assert (REPO / entry.split("::")[0]).is_file(), entry
