"""GPU benchmark and CUDA checks in one bounded run (fits the 10-minute device window).

    python bench/gpu_bench.py --out bench/out/gpu.json [--hf-trainer PATH/hf_trainer_mlm.py]
    python bench/gpu_bench.py --smoke --out /tmp/gpu-smoke.json   # the same code path on CPU, tiny model, seconds

1. CUDA tests: tests/training/test_unpadded.py (flash varlen attention vs the reference kernel; padded vs unpadded
   forward and backward with 16 heads and lengths 1..512), tests/training/test_fastpath_check.py (the start-of-training
   self-check on the flash kernel), tests/training/test_mlm_loss.py, and `--micro-batch-size auto` under torchrun with
   one GPU (tests/e2e/test_distributed.py).
2. cpt on the real base's shape (24 layers / 1024 hidden, random weights), bf16, seq 512 and 128:
   steady tokens/s, MFU, peak memory and the micro-batch that `auto` found (the CUDA search), with
   --unpad on and off, and with the loader's unpadding metadata (the sync-free step); each unpadded run also
   records the self-check's errors (`fastpath_check`).
3. The reference: ../shared/bench/hf_trainer_mlm.py (HF Trainer + DataCollatorForLanguageModeling)
   on the same shape, seq 512, bf16, same GPU, when --hf-trainer is given.

MFU (MFU_FORMULA, also written into the output) = real tokens/s x FLOPs per token / the GPU's peak, with
FLOPs per token = 6 x non-embedding params (forward + backward of every matmul) + 12 x layers x hidden x
sum(len^2) / sum(len) (QK^T and AV, forward + backward, per sequence: attention grows with each sequence's own
length, so padding never counts). For full blocks of `seq` tokens this is the reference script's
6 N + 12 L h seq. The peak (dense bf16 tensor-core FLOP/s) is chosen by the device name (PEAK_BF16_FLOPS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MFU_FORMULA = ("mfu = real_tokens_per_s * (6 * non_embedding_params + 12 * layers * hidden * sum(len^2) / sum(len)) "
               "/ peak_dense_bf16_flops")
# Dense bf16 tensor-core peaks, FLOP/s: NVIDIA's datasheet figures "with sparsity" halved. First match of the
# device name wins, so the NVL and PCIe parts come before the SXM ones they share a name with.
PEAK_BF16_FLOPS = (
    ("H200 NVL", 835e12), ("H100 NVL", 835e12),  # 1,671 TFLOP/s sparse per GPU
    ("H100 PCIe", 756e12),  # 1,513 sparse
    ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),  # SXM: 1,979 sparse ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),  # SXM and PCIe: 624 sparse
)
CUDA_TESTS = ("tests/training/test_unpadded.py", "tests/training/test_fastpath_check.py", "tests/training/test_mlm_loss.py",
              "tests/e2e/test_distributed.py::test_auto_micro_batch_under_torchrun_on_one_gpu",
              "tests/training/test_autobatch.py")
PEAK_FLOPS = 989e12  # H100/H200 SXM, the target machines (bench/loader_bench.py sizes the loader against it)
ASSUMED_PEAK = ("H100/H200 SXM (assumed: device not in the table)", PEAK_FLOPS)


def sh(command: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO, timeout=timeout, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def peak_bf16_flops(device_name: str | None) -> tuple[str, float]:
    """(which part, dense bf16 FLOP/s) for a CUDA device name such as 'NVIDIA H100 80GB HBM3'."""
    for part, flops in PEAK_BF16_FLOPS:
        if device_name and part.lower() in device_name.lower():
            return part, flops
    return ASSUMED_PEAK


def flops_per_token(layers: int, hidden: int, attention_len: float, non_embedding_params: int) -> float:
    """Training FLOPs per real token (MFU_FORMULA): matmuls 6 N, attention 12 L h attention_len, where
    attention_len = sum(len^2) / sum(len) over the sequences (= seq for full blocks of seq tokens)."""
    return 6 * non_embedding_params + 12 * layers * hidden * attention_len


def mfu(tokens_per_s: float, layers: int, hidden: int, non_embedding_params: int, sum_len_sq: int, sum_len: int,
        peak_flops: float) -> float:
    attention_len = sum_len_sq / max(sum_len, 1)
    return tokens_per_s * flops_per_token(layers, hidden, attention_len, non_embedding_params) / peak_flops


def cpt_throughput(work: Path, base: Path, seq: int, unpad: str, steps: int, warmup: int,
                   device: str = "cuda", global_batch_size: int | None = None, loader_metadata: bool = False) -> dict:
    import dataclasses

    import torch

    from cpt.config import PrepareConfig, TokenizeConfig, TrainConfig
    from cpt.data.prepare import prepare_corpus
    from cpt.data.tokenization import tokenize_corpus
    from cpt.training.batches import BatchFeed
    from cpt.training.checkpoint import TrainState
    from cpt.training.distributed import setup
    from cpt.training.model import asset_path
    from cpt.training.session import loader_workers, start_session
    from cpt.training.step import train_step

    run_dir = work / f"run-{seq}"
    corpus = os.environ.get("CPT_BENCH_CORPUS", str(asset_path("sample_corpus.txt")))
    prepare_corpus(PrepareConfig(output=run_dir, corpus=(corpus,)))
    tokenize_corpus(TokenizeConfig(output=run_dir, base_model=base, max_seq_length=seq))
    config = TrainConfig(output=run_dir, base_model=base, global_batch_size=global_batch_size or (64 if seq == 512 else 256),
                         max_steps=10**6, unpad=unpad, micro_batch_size="auto", device=device,
                         loader_workers=2)  # the CUDA default, also in --smoke: its processes are part of the path
    context = setup(device)
    on_cuda = context.device.type == "cuda"
    synchronize = torch.cuda.synchronize if on_cuda else (lambda: None)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    checked: list = []
    with guard_recorded(checked):
        session = start_session(config, context)
    objective = getattr(session.objective, "module", session.objective)
    state = TrainState()
    session.objective.train()
    tokens = tokens_sq = 0
    # Batches come as in `cpt train`: built ahead by loader processes on CUDA, with the unpadding metadata (index
    # tensors built there, so the step makes no host-device sync); loader_metadata=False: the step without it.
    feed = BatchFeed(dataclasses.replace(session.batching, with_unpadding_metadata=loader_metadata), state.sampler,
                     workers=loader_workers(config, context.device), steps=warmup + steps, pin_memory=on_cuda)
    with feed:
        for index in range(warmup + steps):
            if index == warmup:
                synchronize()
                started, tokens, tokens_sq, wait_before = time.perf_counter(), 0, 0, feed.wait_s
            prepared = feed.next_step()
            _sums, state.sampler = train_step(session, state, prepared)  # not read back: no sync per step
            state.step += 1
            lengths = [batch["attention_mask"].sum(dim=1).long() for batch in prepared[0]]  # real tokens, host side
            tokens += sum(int(length.sum()) for length in lengths)
            tokens_sq += sum(int((length * length).sum()) for length in lengths)
        synchronize()
    seconds = time.perf_counter() - started
    model = session.model
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    cfg = model.config
    tokens_per_s = tokens / seconds
    gpu = torch.cuda.get_device_name() if on_cuda else None
    peak_part, peak = peak_bf16_flops(gpu)
    result = {
        "tool": "cpt", "seq_length": seq, "unpad": unpad, "unpadded": bool(objective.unpad),
        "loader_metadata": loader_metadata,
        "micro_batch_size": session.micro_batch_size,
        "global_batch_size": config.global_batch_size, "s_per_step": seconds / steps, "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, cfg.num_hidden_layers, cfg.hidden_size, non_embedding, tokens_sq, tokens, peak),
        "mfu_formula": MFU_FORMULA, "peak_part": peak_part, "peak_bf16_tflops": peak / 1e12,
        "mean_attention_len": tokens_sq / max(tokens, 1), "non_embedding_params": non_embedding,
        "fastpath_check": checked[0] if checked else None,
        "data_wait_share": (feed.wait_s - wait_before) / seconds,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
        "gpu": gpu, "device": str(context.device),
    }
    del session, model
    if on_cuda:
        torch.cuda.empty_cache()
    return result


@contextlib.contextmanager
def guard_recorded(found: list):
    """Record the comparison of the unpadded path's start-of-training self-check (cpt/training/fastpath_check.py)."""
    import cpt.training.fastpath_check as fastpath_check

    original = fastpath_check.guard_unpadded_path

    def recording(session, attention=None):
        comparison = original(session, attention)
        if comparison is not None:
            found.append({**comparison.as_dict(), "failures": comparison.failures(session.precision)})
        return comparison

    fastpath_check.guard_unpadded_path = recording
    try:
        yield
    finally:
        fastpath_check.guard_unpadded_path = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/out/gpu.json")
    parser.add_argument("--work", default="/tmp/cpt-gpu-bench")
    parser.add_argument("--hf-trainer", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny model, seq 64, 2 steps, no tests, no reference: checks this script runs")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"mfu_formula": MFU_FORMULA, "checks": {}, "runs": []}

    def save() -> None:
        """After every stage: a run cut short by the device window still leaves what it measured."""
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))

    if not args.smoke:
        # -rP: the CUDA tests print their measured errors (for calibrating cpt/training/fastpath_check.py's tolerances)
        tests = sh([sys.executable, "-m", "pytest", "-q", "-rP", "-p", "no:cacheprovider", *CUDA_TESTS], 300)
        results["checks"]["pytest_cuda"] = {"rc": tests.returncode, "tail": tests.stdout[-4000:]}
        save()
        print(tests.stdout[-4000:], flush=True)

    preset = "tiny" if args.smoke else "large"
    base = work / f"{preset}-base"
    if not base.exists():
        from cpt.training.model import init_base

        init_base(base, preset=preset, seed=0)
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)

    def run_cpt(seq: int, unpad: str, loader_metadata: bool) -> None:
        try:
            results["runs"].append(cpt_throughput(work, base, seq, unpad, steps, warmup,
                                                  device="cpu" if args.smoke else "cuda",
                                                  global_batch_size=8 if args.smoke else None,
                                                  loader_metadata=loader_metadata))
        except Exception as error:  # keep the other measurements when one configuration fails
            results["runs"].append({"tool": "cpt", "seq_length": seq, "unpad": unpad,
                                    "loader_metadata": loader_metadata, "error": repr(error)[:500]})
        print(json.dumps(results["runs"][-1]), flush=True)
        save()

    def run_reference() -> None:
        config = REPO / "cpt" / "assets" / "roberta_wwm_ext_large_config.json"
        corpus = os.environ.get("CPT_BENCH_CORPUS", str(REPO / "cpt" / "assets" / "sample_corpus.txt"))
        reference = sh([sys.executable, args.hf_trainer, "--config", str(config), "--vocab",
                        str(REPO / "cpt" / "assets" / "zh_vocab.txt"), "--corpus", corpus, "--seq-length", "512",
                        "--batch-size", "16", "--steps", "40", "--bf16", "--output-dir", str(work / "hf")], 300)
        lines = [line for line in reference.stdout.splitlines() if line.startswith("{")]
        results["runs"].append(json.loads(lines[-1]) if lines else {"tool": "hf_trainer", "error": reference.stderr[-800:]})
        print(json.dumps(results["runs"][-1]), flush=True)
        save()

    if args.smoke:
        run_cpt(64, "off", False)
        run_cpt(64, "on", True)  # the unpadded path (CPU: reference kernel) fed the loader's metadata
        return
    # The comparison the targets need first (seq 512: unpadded, padded, HF Trainer), then the variants, so a run
    # cut short by the device window loses the least.
    run_cpt(512, "on", False)
    run_cpt(512, "off", False)
    if args.hf_trainer:
        run_reference()
    run_cpt(512, "on", True)  # + the loader's unpadding metadata: no host-device sync per micro-batch
    run_cpt(128, "on", True)


if __name__ == "__main__":
    main()
