"""Forgetting with and without general-text replay (issue 19): a news BERT continued on book reviews.

    .venv/bin/python bench/experiments/replay_eval.py   # writes bench/out/replay/
                                                        # (needs head_warmup_eval.py's data)

1. The news base of bench/experiments/head_warmup_eval.py (a tiny BERT pretrained on ../shared/data/clue_small_2500.txt:
   bench/out/head_warmup/news-run/model) and its review texts (bench/out/head_warmup/data/reviews_mlm.txt).
2. `cpt run` on the reviews for `--steps` steps, once without replay and once with `--replay-corpus` the news
   and `--replay-share` (same steps, lr, batch, seed: each replay run step has fewer review sequences).
3. `cpt eval` of the base and both runs on the review val split and on the news val split (the replay run's
   replay/corpus/val.txt: news documents the base never trained on, its own run used the same split).
Numbers go to OUT/results.json and a markdown table on stdout (docs/evaluation.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "experiments"))
from adaptation_demo import SHARED_DATA, cpt, run_args  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "replay")
    parser.add_argument("--news-base", type=Path, default=REPO / "bench" / "out" / "head_warmup" / "news-run" / "model")
    parser.add_argument("--reviews", type=Path,
                        default=REPO / "bench" / "out" / "head_warmup" / "data" / "reviews_mlm.txt")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--replay-share", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--eval-sequences", type=int, default=300)
    parser.add_argument("--pppl-tokens", type=int, default=0)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    out, news = args.out.resolve(), SHARED_DATA / "clue_small_2500.txt"
    started, timings = time.perf_counter(), {}
    runs = {"reviews, no replay": out / "run-no-replay",
            f"reviews, --replay-share {args.replay_share:g} of news": out / "run-replay"}
    for (label, run_dir), extra in zip(runs.items(), ([], ["--replay-corpus", str(news), "--replay-share",
                                                           str(args.replay_share)]), strict=True):
        cpt(*run_args(args.reviews, args.news_base, run_dir, args.steps, args.lr, args), *extra,
            timings=timings, name=label)
    labels = ["news base", *runs]
    models = [str(args.news_base)] + [str(run / "model") for run in runs.values()]
    flags = [flag for model in models for flag in ("--model", model)]
    held_out = {"reviews": out / "run-no-replay" / "corpus" / "val.txt",
                "news": out / "run-replay" / "replay" / "corpus" / "val.txt"}
    evals = {}
    for name, path in held_out.items():
        evals[name] = json.loads(cpt("eval", *flags, "--corpus", str(path), "--max-seq-length", str(args.max_seq_length),
                                     "--max-sequences", str(args.eval_sequences), "--seed", str(args.seed),
                                     "--pppl-tokens", str(args.pppl_tokens), "--json", timings=timings,
                                     name=f"eval_{name}", capture=True))
    logged = {}
    for label, run_dir in runs.items():
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        evaluated = [m for m in lines if "val_mlm_loss" in m]
        logged[label] = {"step0": evaluated[0], "last": evaluated[-1]}
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "labels": labels, "eval": evals, "logged": logged, "timings_s": timings,
               "total_s": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print("\n| model | review val loss | review val acc | news val loss | news val acc |")
    print("|---|---:|---:|---:|---:|")
    for index, label in enumerate(labels):
        review, news_eval = evals["reviews"]["models"][index], evals["news"]["models"][index]
        print(f"| {label} | {review['mlm_loss']:.3f} | {review['mlm_acc']:.4f} | {news_eval['mlm_loss']:.3f} | "
              f"{news_eval['mlm_acc']:.4f} |")
    print("\nlogged by training (metrics.jsonl, step 0 -> last eval):")
    for label, entries in logged.items():
        first, last = entries["step0"], entries["last"]
        replay = (f", replay_val_mlm_loss {first['replay_val_mlm_loss']:.3f} -> {last['replay_val_mlm_loss']:.3f}"
                  if "replay_val_mlm_loss" in last else "")
        print(f"- {label}: val_mlm_loss {first['val_mlm_loss']:.3f} -> {last['val_mlm_loss']:.3f}{replay}")


if __name__ == "__main__":
    main()
