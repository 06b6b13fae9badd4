"""GPU benchmark and CUDA checks in one bounded run (fits the 10-minute device window).

    python bench/gpu_bench.py --out bench/out/gpu.json [--hf-trainer PATH/hf_trainer_mlm.py]
    python bench/gpu_bench.py --smoke --out /tmp/gpu-smoke.json   # the same code path on CPU, tiny model, seconds

1. CUDA tests: tests/test_unpadded.py (flash varlen attention vs the reference kernel) and tests/test_mlm_loss.py.
2. cpt on the real base's shape (24 layers / 1024 hidden, random weights), bf16, seq 512 and 128:
   steady tokens/s, MFU, peak memory and the micro-batch that `auto` found (the CUDA search), with
   --unpad on and off.
3. The reference: ../shared/bench/hf_trainer_mlm.py (HF Trainer + DataCollatorForLanguageModeling)
   on the same shape, seq 512, bf16, same GPU, when --hf-trainer is given.

MFU = tokens/s x (6 x non-embedding params + 12 x layers x hidden x seq) / peak bf16 FLOP/s
(989e12 for H100/H200 dense), the formula of the reference script. Tokens are real (non-padding)
tokens for cpt; the reference packs full blocks, so all its tokens are real.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 989e12


def sh(command: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO, timeout=timeout, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def flops_per_token(layers: int, hidden: int, seq: int, non_embedding_params: int) -> float:
    return 6 * non_embedding_params + 12 * layers * hidden * seq


def cpt_throughput(work: Path, base: Path, seq: int, unpad: str, steps: int, warmup: int,
                   device: str = "cuda", global_batch_size: int | None = None) -> dict:
    import torch

    from cpt.checkpoint import TrainState
    from cpt.config import PrepareConfig, TokenizeConfig, TrainConfig
    from cpt.distributed import setup
    from cpt.model import asset_path
    from cpt.prepare import prepare_corpus
    from cpt.tokenization import tokenize_corpus
    from cpt.train import batch_feed, start_session, train_step

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
    session = start_session(config, context)
    state = TrainState()
    session.objective.train()
    tokens = 0
    # Batches come as in `cpt train`: built ahead by loader processes on CUDA.
    with batch_feed(session, state.sampler, steps=warmup + steps) as feed:
        for index in range(warmup + steps):
            if index == warmup:
                synchronize()
                started, tokens, wait_before = time.perf_counter(), 0, feed.wait_s
            prepared = feed.next_step()
            _sums, state.sampler = train_step(session, state, prepared)  # not read back: no sync per step
            state.step += 1
            tokens += sum(int(batch["attention_mask"].sum()) for batch in prepared[0])  # real tokens, host side
        synchronize()
    seconds = time.perf_counter() - started
    model = session.model
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    cfg = model.config
    tokens_per_s = tokens / seconds
    result = {
        "tool": "cpt", "seq_length": seq, "unpad": unpad, "micro_batch_size": session.micro_batch_size,
        "global_batch_size": config.global_batch_size, "s_per_step": seconds / steps, "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token(cfg.num_hidden_layers, cfg.hidden_size, seq, non_embedding) / PEAK_FLOPS,
        "data_wait_share": (feed.wait_s - wait_before) / seconds,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
        "gpu": torch.cuda.get_device_name() if on_cuda else None, "device": str(context.device),
    }
    del session, model
    if on_cuda:
        torch.cuda.empty_cache()
    return result


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
    results: dict = {"checks": {}, "runs": []}

    if not args.smoke:
        tests = sh([sys.executable, "-m", "pytest", "-q", "tests/test_unpadded.py", "tests/test_mlm_loss.py"], 300)
        results["checks"]["pytest_cuda"] = {"rc": tests.returncode, "tail": tests.stdout[-1500:]}

    preset = "tiny" if args.smoke else "large"
    base = work / f"{preset}-base"
    if not base.exists():
        from cpt.model import init_base

        init_base(base, preset=preset, seed=0)
    shapes = ((64, "off"),) if args.smoke else ((512, "on"), (512, "off"), (128, "on"))
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    for seq, unpad in shapes:
        try:
            results["runs"].append(cpt_throughput(work, base, seq, unpad, steps, warmup,
                                                  device="cpu" if args.smoke else "cuda",
                                                  global_batch_size=8 if args.smoke else None))
        except Exception as error:  # keep the other measurements when one configuration fails
            results["runs"].append({"tool": "cpt", "seq_length": seq, "unpad": unpad, "error": repr(error)[:500]})
        print(json.dumps(results["runs"][-1]), flush=True)

    if args.hf_trainer and not args.smoke:
        config = REPO / "cpt" / "assets" / "roberta_wwm_ext_large_config.json"
        corpus = os.environ.get("CPT_BENCH_CORPUS", str(REPO / "cpt" / "assets" / "sample_corpus.txt"))
        reference = sh([sys.executable, args.hf_trainer, "--config", str(config), "--vocab",
                        str(REPO / "cpt" / "assets" / "zh_vocab.txt"), "--corpus", corpus, "--seq-length", "512",
                        "--batch-size", "16", "--steps", "40", "--bf16", "--output-dir", str(work / "hf")], 300)
        lines = [line for line in reference.stdout.splitlines() if line.startswith("{")]
        results["runs"].append(json.loads(lines[-1]) if lines else {"tool": "hf_trainer", "error": reference.stderr[-800:]})
        print(json.dumps(results["runs"][-1]), flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
