"""Where `cpt train` spends its time on CPU: a py-spy profile bucketed into phases.

    pip install py-spy   # not a cpt requirement
    python bench/profile_train.py [--steps 40] [--preset small]

Samples every thread of `cpt train` (the benchmark shape: 4 layers / 256 hidden, micro = global
batch 16, packed 128-token sequences) at 50 Hz and sorts each sample into one phase by the
innermost cpt/torch frame it recognises: batch building and masking, forward, backward,
optimizer, gradient clipping, evaluation, checkpointing, start-up (imports, model and data
loading). Writes bench/out/profile.json and the raw collapsed stacks (flamegraph input).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from harness import REPO, venv_bin, write_json
from train_bench import prepare_inputs, thread_env

# First match wins, scanning a stack from its innermost frame outwards.
PHASES = (
    ("evaluation", ("evaluate_mlm",)),
    ("checkpoint", ("save_checkpoint", "_save ")),
    ("batch building + masking", ("build_batch", "mask_sequence", "StepBatching.build", "next_global_batch", "ShardSet.")),
    ("backward", ("Tensor.backward", "_engine_run_backward")),
    ("optimizer", ("Optimizer.step", "Adam.step", "AdamW.step", "GradScaler.step", "_single_tensor_adam",
                   "_multi_tensor_adam", "_fused_adam")),
    ("grad clipping", ("clip_grad_norm_",)),
    ("zero_grad", ("zero_grad",)),
    ("forward: MLM head + loss", ("BertOnlyMLMHead", "BertLMPredictionHead", "cross_entropy", "_mlm_head",
                                  "summed_cross_entropy", "_loss_correct_grad", "_first_max_hits")),
    ("forward: encoder", ("BertModel.forward", "BertEncoder.forward", "masked_lm_logits", "masked_lm_loss")),
    ("start-up", ("start_session", "load_mlm_model", "load_tokenizer", "<module>", "_find_and_load")),
)


def phase_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for phase, markers in PHASES:
            if any(marker in frame for marker in markers):
                return phase
    return "other"


def summarize(raw_path: Path) -> dict:
    """Samples per phase, split by thread (py-spy --threads puts the thread first in each stack)."""
    by_thread: dict[str, Counter] = {}
    total = 0
    for line in raw_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread = next((frame for frame in frames[:2] if frame.startswith("thread ")), "thread ?")
        name = "main" if "MainThread" in thread or thread == frames[0] and "process" in thread else thread
        by_thread.setdefault(name, Counter())[phase_of(frames)] += int(count)
        total += int(count)
    main = by_thread.get("main") or (max(by_thread.values(), key=lambda c: sum(c.values())) if by_thread else Counter())
    main_total = sum(main.values()) or 1
    return {
        "samples": total,
        "main_thread_share": {phase: round(count / main_total, 4) for phase, count in main.most_common()},
        "threads": {name: dict(counter.most_common()) for name, counter in by_thread.items()},
    }


def run(work: Path, out_dir: Path, *, steps: int, rate: int = 50, threads: int = 1) -> dict:
    py_spy = shutil.which("py-spy") or venv_bin("py-spy")
    if not Path(py_spy).exists() and not shutil.which(py_spy):
        return {"error": "py-spy is not installed (pip install py-spy)"}
    base, template = prepare_inputs(work, 128)
    run_dir = work / "profile-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for part in ("corpus", "shards"):
        shutil.copytree(template / part, run_dir / part)
    raw = work / "profile.raw.txt"
    command = [py_spy, "record", "--threads", "-r", str(rate), "-f", "raw", "-o", raw, "--",
               venv_bin("cpt"), "train", "--output", run_dir, "--base-model", base, "--micro-batch-size", "16",
               "--global-batch-size", "16", "--max-steps", str(steps), "--eval-interval", "20",
               "--eval-max-sequences", "16", "--save-interval", str(steps), "--warmup-steps", "0", "--head-warmup", "off"]
    env = {**os.environ, **thread_env(threads)}
    completed = subprocess.run([str(part) for part in command], capture_output=True, text=True, check=False, env=env)
    if completed.returncode != 0 or not raw.exists():
        return {"error": f"py-spy/cpt train failed ({completed.returncode}): {completed.stderr.strip()[-300:]}"}
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(raw, out_dir / "profile.raw.txt")
    return {"settings": {"steps": steps, "rate_hz": rate, "shape": "small (4x256), batch 16 x 128, packed",
                         "threads": threads or "torch default",
                         "command": [str(part) for part in command]},
            **summarize(raw)}


def main() -> None:
    from harness import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "work" / "train")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "profile.json")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads (0 = torch default)")
    args = parser.parse_args()
    payload = run(args.work, args.out.parent, steps=args.steps, threads=args.threads)
    payload["machine"] = machine_info()
    write_json(args.out, payload)
    for phase, share in payload.get("main_thread_share", {}).items():
        print(f"{share:7.1%}  {phase}")
    if "error" in payload:
        print(payload["error"])


if __name__ == "__main__":
    main()
