"""Benchmark 4 (issue 8): a long CPU run of the tiny model; memory must stay flat.

    python bench/soak.py [--steps 3000]

Trains `cpt init-base --preset tiny` on the CLUE sample (max-seq-length 128, micro = global
batch 16) for --steps steps, with evaluation every 500 steps and a checkpoint every 1000, while
the harness samples the process's RSS every half second. Reports RSS at 10 %, 50 % and 100 % of
the run; "flat" means at most 2 % growth over the second half (a leak grows with steps; the
allocator's pools and the first evaluation and checkpoint raise the level once, early on).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
from pathlib import Path

from harness import REPO, SHARED, run_measured, venv_bin, write_json

CLUE = SHARED / "data" / "clue_small_2500.txt"
STEP_LINE = re.compile(r"\bstep (\d+)/\d+\s")
FLAT_GROWTH = 0.02  # more than 2 % growth over the second half of the run counts as not flat (a leak)


def run(work: Path, *, steps: int = 3000, threads: int = 1, log=print) -> dict:
    cpt = venv_bin("cpt")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base, run_dir = work / "base-tiny", work / "run"
    subprocess.run([cpt, "init-base", "--preset", "tiny", base], check=True, capture_output=True)
    subprocess.run([cpt, "prepare", "--corpus", CLUE, "--output", run_dir], check=True, capture_output=True)
    subprocess.run([cpt, "tokenize", "--output", run_dir, "--base-model", base, "--max-seq-length", "128",
                    "--workers", "2"], check=True, capture_output=True)
    log(f"soak: cpt train, tiny model, {steps} steps")
    command = [cpt, "train", "--output", run_dir, "--base-model", base, "--micro-batch-size", "16",
               "--global-batch-size", "16", "--max-steps", str(steps), "--eval-interval", "500",
               "--eval-max-sequences", "64", "--save-interval", "1000", "--lr", "1e-3", "--head-warmup", "off"]
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    result = run_measured(command, cwd=work, log_path=work / "train.log", interval=0.5, env=env)
    payload = {"settings": {"model": "tiny (2 layers, hidden 64, vocab 21128)", "steps": steps, "seq_length": 128,
                            "batch_size": 16, "eval_interval": 500, "save_interval": 1000, "threads": threads or "torch default"},
               "run": result.summary()}
    payload["run"]["command"] = [str(part) for part in command]
    if result.returncode != 0:
        payload["error"] = f"cpt train exited {result.returncode}: " + " | ".join(x.text for x in result.lines[-3:])
        return payload
    step_at = [(line.t, int(match.group(1))) for line in result.lines if (match := STEP_LINE.search(line.text))]

    def step_of(t: float) -> int:
        done = [step for when, step in step_at if when <= t]
        return done[-1] if done else 0

    samples = [(s.t, s.rss_mb) for s in result.samples]
    start = next((t for t, step in step_at if step >= steps // 10), samples[0][0])
    steady = [(t, rss) for t, rss in samples if t >= start]

    def rss_near(fraction: float) -> float:
        target = next((t for t, step in step_at if step >= fraction * steps), samples[-1][0])
        window = [rss for t, rss in samples if abs(t - target) <= 5] or [samples[-1][1]]
        return round(statistics.median(window), 1)

    first, middle, last = rss_near(0.1), rss_near(0.5), rss_near(1.0)
    growth = (last - first) / first if first else None
    second_half = (last - middle) / middle if middle else None
    slope = None
    if len(steady) > 10:
        steps_axis = [step_of(t) for t, _ in steady]
        if max(steps_axis) > min(steps_axis):
            slope = statistics.linear_regression(steps_axis, [rss for _, rss in steady]).slope * 1000
    payload["rss"] = {
        "at_10pct_mb": first, "at_50pct_mb": middle, "at_100pct_mb": last,
        "peak_mb": round(max(rss for _, rss in samples), 1),
        "growth_after_10pct": round(growth, 4) if growth is not None else None,
        "growth_second_half": round(second_half, 4) if second_half is not None else None,
        "slope_mb_per_1000_steps": round(slope, 2) if slope is not None else None,
        "flat": second_half is not None and second_half <= FLAT_GROWTH,
        "timeline": [{"t_s": round(t, 1), "step": step_of(t), "rss_mb": round(rss, 1)} for t, rss in samples[::4]],
    }
    payload["steps_per_s"] = round(steps / result.wall_s, 2)
    return payload


def main() -> None:
    from harness import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "work" / "soak")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "soak.json")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads (0 = torch default)")
    args = parser.parse_args()
    payload = run(args.work, steps=args.steps, threads=args.threads)
    payload["machine"] = machine_info()
    write_json(args.out, payload)
    print({key: value for key, value in payload.get("rss", {}).items() if key != "timeline"})


if __name__ == "__main__":
    main()
