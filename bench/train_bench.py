"""Benchmark 3 (+ UER-py): CPU training throughput of `cpt train`, side by side with Hugging Face
Trainer (../shared/bench/hf_trainer_mlm.py) and, given a checkout, UER-py's pretrain.py.

    python bench/train_bench.py [--steps 60] [--rounds 2] [--uer-path /tmp/UER-py --uer-python PY]

One shape for all: BERT 4 layers / hidden 256 / 4 heads / FFN 1024, vocab 21128
(`cpt init-base --preset small`), micro-batch 16 = global batch 16, sequences of 128 tokens.
cpt trains on packed shards (--pack-documents, so its sequences are nearly full like the other
tools' fixed 128-token blocks); UER-py on its own dataset.pt (dup_factor 1, static whole-word +
span masks). Runs are interleaved (cpt, HF, UER, cpt, HF, UER ...) and ratios are taken per round,
because this machine is shared and its speed swings several-fold within minutes.

Per run: steady seconds per step from the tool's own clock (cpt: metrics.jsonl tokens_per_s
windows; HF: the script's JSON; UER: its report lines), skipping the first --warmup-steps;
CPU seconds per step of the process over the same steps (from timestamped output lines and
sampled CPU time; much less sensitive to other load than wall time); peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from harness import REPO, SHARED, RunResult, run_measured, venv_bin, write_json
from uer_side import UerSide, optional_uer_side, report_windows

CLUE = SHARED / "data" / "clue_small_2500.txt"
VOCAB = REPO / "cpt" / "assets" / "zh_vocab.txt"
CPT_STEP = re.compile(r"\bstep (\d+)/\d+\s")
HF_STEP = re.compile(r"^hf-step (\d+) ")


def prepare_inputs(work: Path, seq_length: int) -> tuple[Path, Path]:
    """A small base model and a run dir holding packed shards of the CLUE sample (made once)."""
    base = work / "base-small"
    template = work / "template"
    cpt = venv_bin("cpt")
    if not (base / "config.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run([cpt, "init-base", "--preset", "small", base], check=True, capture_output=True)
    if not (template / "shards" / "manifest.json").exists():
        subprocess.run([cpt, "prepare", "--corpus", CLUE, "--output", template], check=True, capture_output=True)
        subprocess.run([cpt, "tokenize", "--output", template, "--base-model", base, "--max-seq-length", str(seq_length),
                        "--pack-documents", "--workers", "2"], check=True, capture_output=True)
    return base, template


def _step_times(result: RunResult, pattern: re.Pattern) -> dict[int, float]:
    """step -> when its line appeared (seconds since the start)."""
    times = {}
    for line in result.lines:
        match = pattern.search(line.text)
        if match:
            times.setdefault(int(match.group(1)), line.t)
    return times


def _cpu_per_step(result: RunResult, times: dict[int, float], first: int, last: int) -> float | None:
    if first not in times or last not in times or last <= first:
        return None
    return result.cpu_between(times[first], times[last]) / (last - first)


def step_stats(per_step_s: list[float]) -> dict:
    """Median (the headline), mean and 10th percentile (the least disturbed steps) of seconds per step."""
    if not per_step_s:
        return {"s_per_step": None, "mean_s_per_step": None, "p10_s_per_step": None, "steps_measured": 0}
    ordered = sorted(per_step_s)
    return {
        "s_per_step": round(statistics.median(ordered), 4),
        "mean_s_per_step": round(statistics.fmean(ordered), 4),
        "p10_s_per_step": round(ordered[int(0.1 * (len(ordered) - 1))], 4),
        "steps_measured": len(ordered),
    }


def thread_env(threads: int) -> dict:
    """Environment that pins every tool to `threads` intra-op threads (0: leave each tool's default)."""
    if not threads:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _common(result: RunResult) -> dict:
    return {"wall_s": round(result.wall_s, 2), "cpu_s": round(result.cpu_s, 2),
            "peak_rss_mb": round(result.peak_rss_mb, 1), "foreign_cpu_share": round(result.foreign_cpu_share, 2),
            "returncode": result.returncode}


def _tail(result: RunResult) -> str:
    return " | ".join(line.text.strip() for line in result.lines[-4:] if line.text.strip())


def cpt_command(source: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """How to start cpt: the venv's, or (`source`: a checkout, e.g. a git worktree of an older commit) the
    package in that tree, run with the same interpreter and libraries."""
    if source is None:
        return [venv_bin("cpt")], {}
    return [sys.executable, "-m", "cpt"], {"PYTHONPATH": str(Path(source).resolve())}


def tree_label(source: Path) -> str:
    """`cpt @REV` for a row timing the cpt in `source`."""
    revision = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip()
    return f"cpt @{revision or Path(source).name}"


def _cpt_train_flags(source: Path | None = None) -> str:
    command, env = cpt_command(source)
    return subprocess.run([*command, "train", "--help"], capture_output=True, text=True, check=False,
                          env={**os.environ, **env}).stdout


def run_cpt(work: Path, base: Path, template: Path, *, steps: int, warmup: int, batch_size: int, threads: int = 0,
            extra: list[str] | None = None, source: Path | None = None) -> dict:
    """One `cpt train` run logging every step; evaluation (1 sequence) only at step 0 and at the end."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run_dir = work / "run"
    run_dir.mkdir()
    for part in ("corpus", "shards"):
        shutil.copytree(template / part, run_dir / part)
    per_step = ["--log-interval", "1", "--eval-interval", str(steps)]
    flags = _cpt_train_flags(source)
    cpt, source_env = cpt_command(source)
    if "--log-interval" not in flags:  # older cpt: it logged every min(eval-interval, 50) steps
        per_step = ["--eval-interval", "1"]
    if "--head-warmup" in flags:  # the random base would get a head phase: time whole-model steps only
        per_step += ["--head-warmup", "off"]
    command = [
        *cpt, "train", "--output", run_dir, "--base-model", base, "--micro-batch-size", str(batch_size),
        "--global-batch-size", str(batch_size), "--max-steps", str(steps), *per_step, "--eval-max-sequences", "1",
        "--save-interval", str(10 * steps), "--warmup-steps", "0", *(extra or []),
    ]
    result = run_measured(command, cwd=work, log_path=work / "train.log", env={**thread_env(threads), **source_env})
    row = {"tool": "cpt", **_common(result)}
    metrics_path = run_dir / "metrics.jsonl"
    if result.returncode != 0 or not metrics_path.exists():
        return {**row, "error": f"cpt train exited {result.returncode}: {_tail(result)}"}
    entries = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    per_step, tokens, seconds = [], 0, 0.0
    previous = {"step": 0, "tokens_seen": 0}
    for entry in (entry for entry in entries if "tokens_per_s" in entry):
        window_tokens = entry["tokens_seen"] - previous["tokens_seen"]
        window_steps = entry["step"] - previous["step"]
        if previous["step"] >= warmup and window_steps > 0:
            window_s = window_tokens / entry["tokens_per_s"]
            per_step.extend([window_s / window_steps] * window_steps)
            tokens += window_tokens
            seconds += window_s
        previous = entry
    times = _step_times(result, CPT_STEP)
    stats = step_stats(per_step)
    return {
        **row, **stats,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "tokens_per_step": round(tokens / len(per_step), 1) if per_step else None,
        "cpu_s_per_step": _round(_cpu_per_step(result, times, warmup, steps - 1)),
        "source": "metrics.jsonl, one window per step (evaluation and logging excluded)",
    }


def run_hf(work: Path, base: Path, *, steps: int, warmup: int, batch_size: int, seq_length: int,
           threads: int = 0) -> dict:
    """../shared/bench/hf_trainer_mlm.py at its defaults for this shape, through bench/hf_clock.py."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    command = [
        sys.executable, REPO / "bench" / "hf_clock.py", "--config", base / "config.json", "--vocab", VOCAB,
        "--corpus", CLUE, "--seq-length", str(seq_length), "--batch-size", str(batch_size), "--steps", str(steps),
        "--warmup-steps", str(warmup), "--output-dir", work / "hf_trainer_mlm.out",
    ]
    result = run_measured(command, cwd=work, log_path=work / "hf.log", env=thread_env(threads))
    row = {"tool": "hf_trainer", **_common(result)}
    reported = None
    for line in reversed(result.lines):
        if line.text.startswith("{") and '"tool": "hf_trainer"' in line.text:
            reported = json.loads(line.text)
            break
    if result.returncode != 0 or reported is None:
        return {**row, "error": f"hf_trainer_mlm.py exited {result.returncode}: {_tail(result)}"}
    clock = {}
    for line in result.lines:
        match = HF_STEP.search(line.text)
        if match:
            clock[int(match.group(1))] = float(line.text.split()[2])
    per_step = [clock[step] - clock[step - 1] for step in sorted(clock) if step > warmup and step - 1 in clock]
    times = _step_times(result, HF_STEP)
    return {
        **row, **step_stats(per_step),
        "tokens_per_s": round(batch_size * seq_length / statistics.median(per_step), 1) if per_step else None,
        "tokens_per_step": batch_size * seq_length,
        "cpu_s_per_step": _round(_cpu_per_step(result, times, warmup, steps)),
        "script_s_per_step": reported["s_per_step"],
        "script_tokens_per_s": reported["tokens_per_s"],
        "script_max_rss_mb": reported.get("max_rss_mb"),
        "source": "the script's StepClock, one timestamp per step",
    }


def run_uer(uer: UerSide, work: Path, dataset: Path, *, steps: int, warmup: int, batch_size: int,
            seq_length: int, threads: int = 0) -> dict:
    """UER-py pretrain.py on CPU, reporting every step."""
    shutil.rmtree(work, ignore_errors=True)
    result = uer.pretrain(work, dataset, VOCAB, steps=steps, batch_size=batch_size, report_steps=1,
                          env=thread_env(threads))
    row = {"tool": "uer", **_common(result)}
    windows = report_windows(result)
    if result.returncode != 0 or not windows:
        return {**row, "error": f"UER-py pretrain.py exited {result.returncode}: {_tail(result)}"}
    per_step = [batch_size * seq_length / w["tokens_per_s"] for w in windows if w["step"] > warmup]
    times = {w["step"]: w["t"] for w in windows}
    stats = step_stats(per_step)
    return {
        **row, **stats,
        "tokens_per_s": round(batch_size * seq_length / stats["s_per_step"], 1) if stats["s_per_step"] else None,
        "tokens_per_step": None,
        "cpu_s_per_step": _round(_cpu_per_step(result, times, warmup, steps)),
        "source": "UER-py's report line every step; it counts padded tokens (batch x 128); static masks (dup 1)",
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return round(value, digits) if value is not None else None


def _median(values) -> float | None:
    values = [value for value in values if value is not None]
    return round(statistics.median(values), 4) if values else None


def speedup_key(ours: str, other: str) -> str:
    return f"cpt_speedup_vs_{other}" if ours == "cpt" else f"{ours} speedup vs {other}"


def summarize(rounds: list[dict], variants: list[str] | None = None) -> dict:
    """Medians per tool and per-round ratios (cpt's speed over the other's, > 1 = cpt faster)."""
    summary: dict = {}
    for tool in ("cpt", "hf_trainer", "uer", *(variants or [])):
        rows = [r[tool] for r in rounds if tool in r and "error" not in r[tool]]
        if not rows:
            continue
        summary[tool] = {key: _median(row.get(key) for row in rows)
                         for key in ("s_per_step", "p10_s_per_step", "mean_s_per_step", "tokens_per_s",
                                     "cpu_s_per_step", "peak_rss_mb", "tokens_per_step", "foreign_cpu_share")}
        summary[tool]["steps_per_s"] = _round(1 / summary[tool]["s_per_step"]) if summary[tool]["s_per_step"] else None
    pairs = [("cpt", other) for other in ("hf_trainer", "uer", *(variants or []))]
    pairs += [(variant, other) for variant in variants or [] for other in ("hf_trainer", "uer")]
    for ours, other in pairs:
        ratios: dict[str, list[float]] = {"median": [], "p10": [], "cpu": []}
        for r in rounds:
            a, b = r.get(ours, {}), r.get(other, {})
            if not a or not b or "error" in a or "error" in b:
                continue
            for name, key in (("median", "s_per_step"), ("p10", "p10_s_per_step"), ("cpu", "cpu_s_per_step")):
                if a.get(key) and b.get(key):
                    ratios[name].append(b[key] / a[key])  # their seconds over ours: > 1 = ours faster
        if any(ratios.values()):
            summary[speedup_key(ours, other)] = {
                **{f"{name}_per_round": [round(x, 2) for x in values] for name, values in ratios.items()},
                **{name: _median(values) for name, values in ratios.items()},
            }
    return summary


def run(work: Path, *, uer: UerSide | None, uer_dataset: Path | None, steps: int = 60, warmup: int = 10,
        rounds: int = 2, batch_size: int = 16, seq_length: int = 128, threads: int = 0,
        cpt_variants: list[str] | None = None, cpt_trees: list[Path] | None = None, skip_hf: bool = False,
        log=print) -> dict:
    base, template = prepare_inputs(work, seq_length)
    if uer is not None and (uer_dataset is None or not uer_dataset.exists()):
        log("train: UER-py preprocess (dup_factor 1) for its pretrain run")
        _result, uer_dataset = uer.preprocess(work / "uer-data", CLUE, VOCAB, dup_factor=1, processes=2,
                                              seq_length=seq_length)
    results = []
    for index in range(rounds):
        row = {}
        sources = [None, *(cpt_trees or [])]  # None: this checkout's cpt
        if index % 2:  # every second round the other trees first: no side always runs right after HF Trainer
            sources.reverse()
        for source in sources:
            name = "cpt" if source is None else tree_label(source)
            log(f"train: round {index + 1}/{rounds}: {name} train" + (f" ({source})" if source else ""))
            row[name] = run_cpt(work / (f"cpt-{index}" if source is None else f"cpt-tree-{Path(source).name}-{index}"),
                                base, template, steps=steps, warmup=warmup, batch_size=batch_size, threads=threads,
                                source=source)
        for number, flags in enumerate(cpt_variants or []):
            log(f"train: round {index + 1}/{rounds}: cpt train {flags}")
            row[f"cpt {flags}"] = run_cpt(work / f"cpt-variant{number}-{index}", base, template, steps=steps,
                                          warmup=warmup, batch_size=batch_size, threads=threads, extra=flags.split())
        if not skip_hf:
            log(f"train: round {index + 1}/{rounds}: HF Trainer")
            row["hf_trainer"] = run_hf(work / f"hf-{index}", base, steps=steps, warmup=warmup, batch_size=batch_size,
                                       seq_length=seq_length, threads=threads)
        if uer is not None:
            log(f"train: round {index + 1}/{rounds}: UER-py pretrain")
            row["uer"] = run_uer(uer, work / f"uer-{index}", uer_dataset, steps=steps, warmup=warmup,
                                 batch_size=batch_size, seq_length=seq_length, threads=threads)
        results.append(row)
    return {
        "settings": {"layers": 4, "hidden": 256, "heads": 4, "intermediate": 1024, "vocab": 21128,
                     "seq_length": seq_length, "micro_batch_size": batch_size, "global_batch_size": batch_size,
                     "steps": steps, "warmup_steps_skipped": warmup, "rounds": rounds, "corpus": str(CLUE),
                     "cpt_shards": "--pack-documents --max-seq-length 128",
                     "threads": threads or "each tool's default (torch: one per core)"},
        "rounds": results,
        "summary": summarize(results, [f"cpt {flags}" for flags in cpt_variants or []]
                             + [tree_label(tree) for tree in cpt_trees or []]),
    }


def main() -> None:
    from harness import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "work" / "train")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "train.json")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="OMP/MKL threads for every tool; 0 = their default")
    parser.add_argument("--uer-path", type=Path)
    parser.add_argument("--uer-python", default=None)
    parser.add_argument("--uer-dataset", type=Path, help="a UER-py dataset.pt to train on (default: make one)")
    parser.add_argument("--cpt-variant", action="append", default=[],
                        help="extra cpt train flags to compare with the default run, e.g. '--unpad on' (repeatable)")
    parser.add_argument("--cpt-tree", action="append", default=[], type=Path,
                        help="also time the cpt of this source tree (e.g. a git worktree of an older commit), "
                             "interleaved with the current one (repeatable)")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    uer = optional_uer_side(args.uer_path, args.uer_python or sys.executable, "train")
    payload = run(args.work, uer=uer, uer_dataset=args.uer_dataset, steps=args.steps, rounds=args.rounds,
                  threads=args.threads, cpt_variants=args.cpt_variant, cpt_trees=args.cpt_tree,
                  skip_hf=args.skip_hf)
    payload["machine"] = machine_info()
    write_json(args.out, payload)
    print(json.dumps(payload["summary"], indent=1))


if __name__ == "__main__":
    main()
