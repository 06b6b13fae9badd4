"""Domain adaptation, end to end on CPU: a news BERT continued on book reviews, measured with cpt eval / probe.

    .venv/bin/python bench/experiments/adaptation_demo.py --fresh    # ~5.5 min on 2 quiet CPU cores; writes bench/out/adaptation/

1. A tiny random BERT (`cpt init-base --preset tiny`, 2 layers x 64, the real 21128-token vocab) is
   trained briefly with `cpt run` on ../shared/data/clue_small_2500.txt (news): the "news base".
2. The news base is continued with `cpt run` on the texts of ../shared/data/book_review_cls.tsv
   (rows 0-7 of every 10; labels dropped): the "review model".
3. Control: the news base continued for as many steps, at the same settings, on the news again. Any
   further training helps a model this young, so the domain effect is review model vs control.
4. `cpt eval` scores all of them (and the random init) on held-out reviews (the review run's
   corpus/val.txt) and on held-out news (the news run's val.txt), at the same fixed masks.
5. `cpt probe` fine-tunes each as a review sentiment classifier on rows 8 of every 10 (2000 labelled
   reviews) and tests on rows 9 of every 10 (2000 reviews no model saw in any stage).
6. `cpt report` writes each run's report.md and curves.png; the review run's curves are copied to
   docs/adaptation_curves.png and the numbers to OUT/results.json (docs/evaluation.md quotes them).

Every step is a `cpt` command run in a subprocess and printed, so the demo doubles as a recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


def cpt(*args: str, timings: dict, name: str, capture: bool = False) -> str:
    """Run `python -m cpt ARGS`, print the command and its wall time; stdout when capture."""
    command = [sys.executable, "-m", "cpt", *args]
    print("$ cpt " + " ".join(args), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, text=True, stdout=subprocess.PIPE if capture else None)
    timings[name] = round(time.perf_counter() - started, 1)
    if result.returncode != 0:
        sys.exit(f"adaptation_demo: `cpt {args[0]}` failed with exit code {result.returncode}")
    print(f"  ({timings[name]:.0f} s)", flush=True)
    return result.stdout or ""


def split_reviews(source: Path, data_dir: Path) -> dict[str, int]:
    """Rows 0-7 of every 10: MLM texts (no labels); row 8: probe train; row 9: probe test (label<TAB>text)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = source.read_text(encoding="utf-8").splitlines()
    mlm, probe_train, probe_test = [], [], []
    for index, row in enumerate(rows):
        label, _, text = row.partition("\t")
        if not text.strip():
            continue
        if index % 10 == 9:
            probe_test.append(f"{label}\t{text}")
        elif index % 10 == 8:
            probe_train.append(f"{label}\t{text}")
        else:
            mlm.append(text)
    for name, lines in (("reviews_mlm.txt", mlm), ("probe_train.tsv", probe_train), ("probe_test.tsv", probe_test)):
        (data_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"mlm_texts": len(mlm), "probe_train": len(probe_train), "probe_test": len(probe_test)}


def run_args(corpus: Path, base: Path, output: Path, steps: int, lr: float, args) -> list[str]:
    return ["run", "--corpus", str(corpus), "--base-model", str(base), "--output", str(output),
            "--max-seq-length", str(args.max_seq_length), "--micro-batch-size", str(args.batch_size),
            "--global-batch-size", str(args.batch_size), "--max-steps", str(steps), "--lr", str(lr),
            "--warmup-steps", str(max(1, steps // 10)), "--eval-interval", str(max(1, steps // 5)),
            "--save-interval", str(steps), "--eval-max-sequences", str(args.eval_sequences),
            "--val-fraction", "0.02", "--seed", str(args.seed), "--workers", "2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "adaptation")
    parser.add_argument("--preset", default="tiny", help="init-base preset of the random BERT")
    parser.add_argument("--news-steps", type=int, default=800)
    parser.add_argument("--review-steps", type=int, default=400, help="steps of the review run and of the control")
    parser.add_argument("--news-lr", type=float, default=2e-3)
    parser.add_argument("--review-lr", type=float, default=1e-3, help="lr of the review run and of the control")
    parser.add_argument("--batch-size", type=int, default=32, help="MLM sequences per step")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--eval-sequences", type=int, default=300, help="held-out sequences per eval")
    parser.add_argument("--pppl-tokens", type=int, default=512, help="tokens scored one at a time per model")
    parser.add_argument("--probe-steps", type=int, default=200)
    parser.add_argument("--probe-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--docs-dir", type=Path, default=REPO / "docs", help="where the curves picture goes")
    parser.add_argument("--fresh", action="store_true", help="delete --out first (else finished stages are reused)")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = args.out.resolve()
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    data = split_reviews(SHARED_DATA / "book_review_cls.tsv", out / "data")
    print(f"reviews split: {data}", flush=True)

    random_base, news_run, review_run = out / "random-base", out / "news-run", out / "review-run"
    control_run = out / "news-more-run"
    if not (random_base / "config.json").exists():
        cpt("init-base", str(random_base), "--preset", args.preset, "--seed", "0", timings=timings, name="init_base")
    cpt(*run_args(SHARED_DATA / "clue_small_2500.txt", random_base, news_run, args.news_steps, args.news_lr, args),
        timings=timings, name="run_news")
    cpt(*run_args(out / "data" / "reviews_mlm.txt", news_run / "model", review_run, args.review_steps, args.review_lr,
                  args), timings=timings, name="run_reviews")
    cpt(*run_args(SHARED_DATA / "clue_small_2500.txt", news_run / "model", control_run, args.review_steps,
                  args.review_lr, args), timings=timings, name="run_news_control")
    for run in (news_run, review_run, control_run):
        cpt("report", str(run), timings=timings, name=f"report_{run.name}")

    models = [str(random_base), str(news_run / "model"), str(control_run / "model"), str(review_run / "model")]
    model_flags = [flag for model in models for flag in ("--model", model)]
    evals = {}
    for name, held_out in (("reviews", review_run / "corpus" / "val.txt"), ("news", news_run / "corpus" / "val.txt")):
        stdout = cpt("eval", *model_flags, "--corpus", str(held_out), "--max-seq-length", str(args.max_seq_length),
                     "--max-sequences", str(args.eval_sequences), "--seed", str(args.seed),
                     "--pppl-tokens", str(args.pppl_tokens), "--json", timings=timings, name=f"eval_{name}", capture=True)
        evals[name] = json.loads(stdout)
    probe = json.loads(cpt("probe", *model_flags, "--train", str(out / "data" / "probe_train.tsv"),
                           "--test", str(out / "data" / "probe_test.tsv"), "--steps", str(args.probe_steps),
                           "--batch-size", "16", "--lr", str(args.probe_lr), "--max-seq-length", str(args.max_seq_length),
                           "--seed", str(args.seed), "--json", timings=timings, name="probe", capture=True))
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(review_run / "curves.png", args.docs_dir / "adaptation_curves.png")
    shutil.copyfile(news_run / "curves.png", args.docs_dir / "adaptation_news_curves.png")

    total_s = round(time.perf_counter() - started, 1)
    results = {"settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
               "data": data, "eval": evals, "probe": probe, "timings_s": timings, "total_s": total_s,
               "cpu_threads": os.cpu_count()}
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print_summary(results, ["random init", "news base", f"news base + {args.review_steps} news steps (control)",
                            f"news base + {args.review_steps} review steps"])


def print_summary(results: dict, labels: list[str]) -> None:
    print("\n| model | review val loss | review val acc | review PPPL | news val loss | news val acc | news PPPL "
          "| probe acc | probe macro-F1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = zip(labels, results["eval"]["reviews"]["models"], results["eval"]["news"]["models"],
               results["probe"]["models"], strict=True)
    for label, reviews, news, probe in rows:
        print(f"| {label} | {reviews['mlm_loss']:.3f} | {reviews['mlm_acc']:.4f} | {reviews['pseudo_perplexity']:.1f} | "
              f"{news['mlm_loss']:.3f} | {news['mlm_acc']:.4f} | {news['pseudo_perplexity']:.1f} | "
              f"{probe['accuracy']:.4f} | {probe['macro_f1']:.4f} |")
    print(f"\nmajority-class probe accuracy {results['probe']['data']['majority_accuracy']:.4f}; "
          f"total {results['total_s']:.0f} s; per command: {results['timings_s']}")


if __name__ == "__main__":
    main()
