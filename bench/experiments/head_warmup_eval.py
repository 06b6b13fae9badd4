"""Head warm-up, measured: a pretrained BERT whose MLM head is random, continued with and without it.

    .venv/bin/python bench/experiments/head_warmup_eval.py          # ~10 min on 2 CPU cores; writes bench/out/head_warmup/

1. The news base of bench/experiments/adaptation_demo.py (a tiny BERT trained `--news-steps` on
   ../shared/data/clue_small_2500.txt; reused from bench/out/adaptation/ when it is there).
2. Two copies with the head made random the way hfl/chinese-roberta-wwm-ext-large's is: the model's own
   init (seed 123), and large-scale noise (N(0, 3^2) in every head tensor; loss in the tens).
3. Each continued on the book-review texts with `cpt run` for the same `--steps`, `--head-warmup auto`
   and `--head-warmup off`; the news base with its trained head too (the check must not fire).
4. `cpt eval` on held-out reviews and held-out news, `cpt probe` (review sentiment) on every model.
Numbers go to OUT/results.json and a markdown table on stdout (docs/evaluation.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "bench" / "experiments")]

from adaptation_demo import SHARED_DATA, cpt, run_args, split_reviews  # noqa: E402


def random_head_copy(source: Path, target: Path, how: str) -> Path:
    """A copy of the HF dir `source` whose MLM head (transform + output bias) is random."""
    import torch

    from cpt.common.weights import write_state_dict
    from cpt.training.head_warmup import head_parameters, reinit_head
    from cpt.training.model import load_mlm_model

    if (target / "model.safetensors").exists():
        return target
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"), dirs_exist_ok=True)
    model = load_mlm_model(source)
    if how == "reinit":
        reinit_head(model, 123)
    else:
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for parameter in head_parameters(model).values():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 3.0)
    write_state_dict({k: v.contiguous() for k, v in model.state_dict().items()}, target / "model.safetensors")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "head_warmup")
    parser.add_argument("--news-base", type=Path, default=REPO / "bench" / "out" / "adaptation" / "news-run" / "model")
    parser.add_argument("--news-steps", type=int, default=800)
    parser.add_argument("--news-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=300, help="total steps of each continued run (head phase included)")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak lr of the whole-model phase")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--eval-sequences", type=int, default=300)
    parser.add_argument("--probe-steps", type=int, default=200)
    parser.add_argument("--probe-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pppl-tokens", type=int, default=0)
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    data = split_reviews(SHARED_DATA / "book_review_cls.tsv", out / "data")
    news_base = args.news_base
    if not (news_base / "config.json").exists():
        random_base, news_run = out / "random-base", out / "news-run"
        if not (random_base / "config.json").exists():
            cpt("init-base", str(random_base), "--preset", args.preset, "--seed", "0", timings=timings, name="init")
        cpt(*run_args(SHARED_DATA / "clue_small_2500.txt", random_base, news_run, args.news_steps, args.news_lr, args),
            "--head-warmup", "off", timings=timings, name="run_news")
        news_base = news_run / "model"
    bases = {"trained head": news_base, "own-init head": random_head_copy(news_base, out / "base-reinit", "reinit"),
             "noise head": random_head_copy(news_base, out / "base-noise", "noise")}
    runs = {}
    for name, base in bases.items():
        for setting in (("auto",) if name == "trained head" else ("auto", "off")):
            run_dir = out / f"run-{name.split()[0]}-{setting}"
            cpt(*run_args(out / "data" / "reviews_mlm.txt", base, run_dir, args.steps, args.lr, args),
                "--head-warmup", setting, timings=timings, name=f"run_{name}_{setting}")
            runs[f"{name}, --head-warmup {setting}"] = run_dir
    labels = [f"base: {name}" for name in bases] + list(runs)
    models = [str(base) for base in bases.values()] + [str(run / "model") for run in runs.values()]
    flags = [flag for model in models for flag in ("--model", model)]
    evals = {}
    review_val = next(iter(runs.values())) / "corpus" / "val.txt"
    for name, held_out in (("reviews", review_val), ("news", SHARED_DATA / "clue_small_2500.txt")):
        stdout = cpt("eval", *flags, "--corpus", str(held_out), "--max-seq-length", str(args.max_seq_length),
                     "--max-sequences", str(args.eval_sequences), "--seed", str(args.seed), "--pppl-tokens",
                     str(args.pppl_tokens), "--json", timings=timings, name=f"eval_{name}", capture=True)
        evals[name] = json.loads(stdout)
    probe = json.loads(cpt("probe", *flags, "--train", str(out / "data" / "probe_train.tsv"), "--test",
                           str(out / "data" / "probe_test.tsv"), "--steps", str(args.probe_steps), "--batch-size", "16",
                           "--lr", str(args.probe_lr), "--max-seq-length", str(args.max_seq_length), "--seed",
                           str(args.seed), "--json", timings=timings, name="probe", capture=True))
    checks = {label: json.loads((run / "head_check.json").read_text()) for label, run in runs.items()}
    finals = {}
    for label, run in runs.items():
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        finals[label] = {"step0": lines[0], "last_eval": [m for m in lines if "val_mlm_loss" in m][-1],
                         "head_warmup_done_at": next((m["step"] for m in lines if m.get("head_warmup_done")), None)}
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "data": data,
               "labels": labels, "eval": evals, "probe": probe, "checks": checks, "runs": finals, "timings_s": timings,
               "total_s": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print("\n| model | head check (stored / fresh val loss) | head phase | review val loss | review val acc | "
          "news loss | news acc | probe acc | probe macro-F1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for index, label in enumerate(labels):
        review, news, probed = (evals["reviews"]["models"][index], evals["news"]["models"][index],
                                probe["models"][index])
        check = checks.get(label)
        check_text = (f"{'untrained' if check['untrained'] else 'trained'} ({check['stored_val_loss']:.2f} / "
                      f"{check['fresh_val_loss']:.2f})") if check else ""
        ended = finals.get(label, {}).get("head_warmup_done_at")
        print(f"| {label} | {check_text} | {ended or '-'} | {review['mlm_loss']:.3f} | {review['mlm_acc']:.4f} | "
              f"{news['mlm_loss']:.3f} | {news['mlm_acc']:.4f} | {probed['accuracy']:.4f} | {probed['macro_f1']:.4f} |")
    print(f"\nmajority-class probe accuracy {probe['data']['majority_accuracy']:.4f}; total {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
