"""Benchmark 1 (+ UER-py side by side): the data pipeline, `cpt prepare` + `cpt tokenize`.

    python bench/data_bench.py [--synthetic-mb 10,40] [--uer-path /tmp/UER-py --uer-python PY]

Measures, on ../shared/data/clue_small_2500.txt at --max-seq-length 128 with --workers 2:
characters per second (wall, and per CPU second of the whole process tree), peak memory of the
process tree (tokenize runs a ProcessPoolExecutor), and bytes of shards on disk per input
character. Then the same on synthetic corpora of growing size (bench/synth.py), to show that
memory stays flat as the input grows. With a UER-py checkout, its preprocess.py runs on the
same file (whole-word + span masking, dup_factor 5 and 1), interleaved with cpt's runs.
Input characters are those of the corpus file as decoded (newlines included), for every tool.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

from harness import REPO, SHARED, RunResult, venv_bin, write_json
from synth import build_corpus
from uer_side import UerSide, optional_uer_side

CLUE = SHARED / "data" / "clue_small_2500.txt"
VOCAB = REPO / "cpt" / "assets" / "zh_vocab.txt"


def count_chars(path: Path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(len(block) for block in iter(lambda: handle.read(1 << 22), ""))


def dir_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in Path(path).rglob("*") if item.is_file())


def _rates(result: RunResult, chars: int) -> dict:
    return {
        "wall_s": round(result.wall_s, 3),
        "cpu_s": round(result.cpu_s, 3),
        "chars_per_s": round(chars / max(result.wall_s, 1e-9)),
        "chars_per_cpu_s": round(chars / max(result.cpu_s, 1e-9)),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "peak_pss_mb": round(result.peak_pss_mb, 1),
        "peak_rss_single_mb": round(result.peak_rss_single_mb, 1),
        "foreign_cpu_share": round(result.foreign_cpu_share, 2),
        "returncode": result.returncode,
    }


def cpt_pipeline(work: Path, corpus: Path, base: Path, *, workers: int, seq_length: int, chars: int) -> dict:
    """prepare + tokenize into a fresh run dir; returns rates and shard sizes."""
    from harness import run_measured

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cpt = venv_bin("cpt")
    prepare = run_measured([cpt, "prepare", "--corpus", corpus, "--output", work / "run"], cwd=work,
                           log_path=work / "prepare.log")
    if prepare.returncode != 0:
        return {"error": f"cpt prepare exited {prepare.returncode}; see {work / 'prepare.log'}"}
    tokenize = run_measured([cpt, "tokenize", "--output", work / "run", "--base-model", base, "--max-seq-length",
                             str(seq_length), "--workers", str(workers)], cwd=work, log_path=work / "tokenize.log")
    if tokenize.returncode != 0:
        return {"error": f"cpt tokenize exited {tokenize.returncode}; see {work / 'tokenize.log'}"}
    import json

    manifest = json.loads((work / "run" / "shards" / "manifest.json").read_text(encoding="utf-8"))
    shard_bytes = dir_bytes(work / "run" / "shards")
    both_wall = prepare.wall_s + tokenize.wall_s
    both_cpu = prepare.cpu_s + tokenize.cpu_s
    return {
        "chars": chars,
        "prepare": _rates(prepare, chars),
        "tokenize": _rates(tokenize, chars),
        "prepare_tokenize_chars_per_s": round(chars / both_wall),
        "prepare_tokenize_chars_per_cpu_s": round(chars / both_cpu),
        "peak_rss_mb": round(max(prepare.peak_rss_mb, tokenize.peak_rss_mb), 1),
        "peak_pss_mb": round(max(prepare.peak_pss_mb, tokenize.peak_pss_mb), 1),
        "shard_bytes": shard_bytes,
        "shard_bytes_per_char": round(shard_bytes / chars, 3),
        "chunks": {split: len(manifest["splits"][split]["chunks"]) for split in ("train", "val")},
        "sequences": sum(manifest["splits"][split]["sequences"] for split in ("train", "val")),
        "tokens": sum(manifest["splits"][split]["tokens"] for split in ("train", "val")),
    }


def uer_preprocess(uer: UerSide, work: Path, corpus: Path, *, dup_factor: int, workers: int, seq_length: int,
                   chars: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    result, dataset = uer.preprocess(work, corpus, VOCAB, dup_factor=dup_factor, processes=workers,
                                     seq_length=seq_length)
    if result.returncode != 0:
        return {"error": f"UER-py preprocess failed ({result.returncode}); see {work / 'preprocess.log'}"}
    size = dataset.stat().st_size
    return {"chars": chars, "dup_factor": dup_factor, **_rates(result, chars), "dataset_bytes": size,
            "dataset_bytes_per_char": round(size / chars, 3), "dataset_path": str(dataset)}


def _median(values: list[float]) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def run(work: Path, base_tiny: Path, *, uer: UerSide | None, synthetic_mb: list[float], workers: int = 2,
        seq_length: int = 128, repeats: int = 2, uer_synthetic_mb: list[float] | None = None, log=print) -> dict:
    """The whole data benchmark; returns the JSON payload of bench/out/data.json."""
    chars = count_chars(CLUE)
    result: dict = {
        "settings": {"corpus": str(CLUE), "chars": chars, "bytes": CLUE.stat().st_size, "workers": workers,
                     "max_seq_length": seq_length, "base": "cpt init-base --preset tiny (vocab 21128)",
                     "repeats": repeats},
        "cpt": [], "uer_dup5": [], "uer_dup1": [],
    }
    # Interleaved: cpt, UER dup 1, UER dup 5, cpt, UER dup 1 ... so slow spells of the machine hit both.
    for repeat in range(repeats):
        log(f"data: cpt prepare+tokenize on {CLUE.name} (run {repeat + 1}/{repeats})")
        result["cpt"].append(cpt_pipeline(work / f"cpt-{repeat}", CLUE, base_tiny, workers=workers,
                                          seq_length=seq_length, chars=chars))
        if uer is not None:
            log(f"data: UER-py preprocess dup_factor 1 (run {repeat + 1}/{repeats})")
            result["uer_dup1"].append(uer_preprocess(uer, work / f"uer-dup1-{repeat}", CLUE, dup_factor=1,
                                                     workers=workers, seq_length=seq_length, chars=chars))
            if repeat == 0:
                log("data: UER-py preprocess dup_factor 5")
                result["uer_dup5"].append(uer_preprocess(uer, work / "uer-dup5", CLUE, dup_factor=5, workers=workers,
                                                         seq_length=seq_length, chars=chars))
    # Fixed cost: the same commands on 20 documents (imports, tokenizer and dictionary loading, pool start).
    small = work / "clue-20-docs.txt"
    work.mkdir(parents=True, exist_ok=True)
    with open(CLUE, encoding="utf-8") as source:
        small.write_text("".join(line for _, line in zip(range(20), source, strict=False)), encoding="utf-8")
    small_chars = count_chars(small)
    if repeats:
        log("data: fixed cost (20 documents)")
        result["fixed_cost"] = {"chars": small_chars,
                                "cpt": cpt_pipeline(work / "cpt-fixed", small, base_tiny, workers=workers,
                                                    seq_length=seq_length, chars=small_chars)}
    if repeats and uer is not None:
        result["fixed_cost"]["uer_dup1"] = uer_preprocess(uer, work / "uer-fixed", small, dup_factor=1, workers=workers,
                                                          seq_length=seq_length, chars=small_chars)
    result["summary"] = summarize(result)
    result["scaling"] = []
    for size_mb in synthetic_mb:
        corpus = work / f"synthetic-{size_mb:g}mb.txt"
        log(f"data: building a {size_mb:g} MiB synthetic corpus")
        info = build_corpus(CLUE, corpus, int(size_mb * (1 << 20)))
        log(f"data: cpt prepare+tokenize on {corpus.name} ({info['chars']} chars)")
        row = cpt_pipeline(work / f"cpt-synthetic-{size_mb:g}mb", corpus, base_tiny, workers=workers,
                           seq_length=seq_length, chars=info["chars"])
        result["scaling"].append({"size_mb": size_mb, **info, **row})
        shutil.rmtree(work / f"cpt-synthetic-{size_mb:g}mb", ignore_errors=True)
        corpus.unlink(missing_ok=True)
    # A larger input, where start-up no longer dominates: cpt and UER-py dup_factor 1 on the same file.
    result["uer_scaling"] = []
    for size_mb in (uer_synthetic_mb or []) if uer is not None else []:
        corpus = work / f"synthetic-{size_mb:g}mb.txt"
        info = build_corpus(CLUE, corpus, int(size_mb * (1 << 20)))
        log(f"data: cpt vs UER-py dup_factor 1 on {corpus.name}")
        row = {"size_mb": size_mb, **info,
               "cpt": cpt_pipeline(work / "cpt-uer-scaling", corpus, base_tiny, workers=workers,
                                   seq_length=seq_length, chars=info["chars"]),
               "uer_dup1": uer_preprocess(uer, work / "uer-scaling", corpus, dup_factor=1, workers=workers,
                                          seq_length=seq_length, chars=info["chars"])}
        if "error" not in row["cpt"] and "error" not in row["uer_dup1"]:
            row["speed_ratio"] = _ratio(row["cpt"]["prepare_tokenize_chars_per_s"], row["uer_dup1"]["chars_per_s"])
            row["cpu_speed_ratio"] = _ratio(row["cpt"]["prepare_tokenize_chars_per_cpu_s"],
                                            row["uer_dup1"]["chars_per_cpu_s"])
        result["uer_scaling"].append(row)
        shutil.rmtree(work / "cpt-uer-scaling", ignore_errors=True)
        shutil.rmtree(work / "uer-scaling", ignore_errors=True)
        corpus.unlink(missing_ok=True)
    return result


def summarize(result: dict) -> dict:
    ok = [row for row in result["cpt"] if "error" not in row]
    summary = {
        "cpt_tokenize_chars_per_s": _median([row["tokenize"]["chars_per_s"] for row in ok]),
        "cpt_tokenize_chars_per_cpu_s": _median([row["tokenize"]["chars_per_cpu_s"] for row in ok]),
        "cpt_prepare_tokenize_chars_per_s": _median([row["prepare_tokenize_chars_per_s"] for row in ok]),
        "cpt_prepare_tokenize_chars_per_cpu_s": _median([row["prepare_tokenize_chars_per_cpu_s"] for row in ok]),
        "cpt_peak_rss_mb": max((row["peak_rss_mb"] for row in ok), default=None),
        "cpt_peak_pss_mb": max((row["peak_pss_mb"] for row in ok), default=None),
        "cpt_shard_bytes_per_char": ok[0]["shard_bytes_per_char"] if ok else None,
    }
    for dup in ("dup5", "dup1"):
        rows = [row for row in result[f"uer_{dup}"] if "error" not in row]
        if not rows:
            continue
        summary[f"uer_{dup}_chars_per_s"] = _median([row["chars_per_s"] for row in rows])
        summary[f"uer_{dup}_chars_per_cpu_s"] = _median([row["chars_per_cpu_s"] for row in rows])
        summary[f"uer_{dup}_peak_rss_mb"] = max(row["peak_rss_mb"] for row in rows)
        summary[f"uer_{dup}_dataset_bytes_per_char"] = rows[0]["dataset_bytes_per_char"]
        # UER-py's preprocess.py does what cpt prepare + tokenize do together: compare with both stages
        summary[f"speed_ratio_vs_uer_{dup}"] = _ratio(summary["cpt_prepare_tokenize_chars_per_s"],
                                                      summary[f"uer_{dup}_chars_per_s"])
        summary[f"cpu_speed_ratio_vs_uer_{dup}"] = _ratio(summary["cpt_prepare_tokenize_chars_per_cpu_s"],
                                                          summary[f"uer_{dup}_chars_per_cpu_s"])
        summary[f"disk_ratio_uer_{dup}_over_cpt"] = _ratio(summary[f"uer_{dup}_dataset_bytes_per_char"],
                                                           summary["cpt_shard_bytes_per_char"])
    return summary


def main() -> None:
    from harness import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "work" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "data.json")
    parser.add_argument("--synthetic-mb", default="10,40", help="comma-separated sizes in MiB; empty for none")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--uer-path", type=Path)
    parser.add_argument("--uer-python", default=None)
    args = parser.parse_args()
    import sys

    uer = optional_uer_side(args.uer_path, args.uer_python or sys.executable, "data")
    base = args.work / "base-tiny"
    if not base.exists():
        import subprocess

        subprocess.run([venv_bin("cpt"), "init-base", "--preset", "tiny", base], check=True)
    sizes = [float(size) for size in args.synthetic_mb.split(",") if size.strip()]
    payload = run(args.work, base, uer=uer, synthetic_mb=sizes, repeats=args.repeats)
    payload["machine"] = machine_info()
    write_json(args.out, payload)
    print(payload["summary"])


if __name__ == "__main__":
    main()
