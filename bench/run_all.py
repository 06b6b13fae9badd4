"""`make bench`: the CPU benchmarks, side by side, and the tables of docs/benchmarks.md.

    python bench/run_all.py                       # data pipeline + training vs HF Trainer (~10 min idle)
    python bench/run_all.py --uer-path /tmp/UER-py --uer-python /tmp/uer-venv/bin/python
    python bench/run_all.py --soak --skip-data --skip-train --skip-loader   # the 3000-step memory soak alone
    python bench/run_all.py --profile                              # + a py-spy profile of cpt train

Writes bench/out/{data,train,loader,soak,profile}.json and rewrites, in docs/benchmarks.md, the tables
of what ran (a run without UER-py keeps the recorded UER-py tables). Every comparison runs its
tools interleaved in this one invocation; read the ratios, not the absolute numbers, on a shared
machine. UER-py (Apache-2.0) is never copied here: pass a local checkout and a Python that has
its requirements (six, packaging, regex, numpy, torch, jieba); without one, its columns are skipped.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data_bench  # noqa: E402
import loader_bench  # noqa: E402
import profile_train  # noqa: E402
import report  # noqa: E402
import soak  # noqa: E402
import train_bench  # noqa: E402
from harness import REPO, machine_info, venv_bin, write_json  # noqa: E402
from uer_side import optional_uer_side  # noqa: E402


def _foreign_load(payload) -> float | None:
    """Mean cores other processes kept busy over every measured run in a payload."""
    values = []

    def walk(node):
        if isinstance(node, dict):
            if "foreign_cpu_share" in node and isinstance(node["foreign_cpu_share"], (int, float)):
                values.append(node["foreign_cpu_share"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(payload)
    return round(sum(values) / len(values), 2) if values else None


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uer-path", type=Path, default=os.environ.get("CPT_BENCH_UER_PATH") or None,
                        help="a local UER-py checkout (env CPT_BENCH_UER_PATH); its columns are skipped without one")
    parser.add_argument("--uer-python", default=os.environ.get("CPT_BENCH_UER_PYTHON") or sys.executable,
                        help="Python with UER-py's requirements (env CPT_BENCH_UER_PYTHON; default: this one)")
    parser.add_argument("--synthetic-mb", default="10,40",
                        help="sizes (MiB) of the synthetic corpora for the memory-vs-size table; '' for none")
    parser.add_argument("--data-repeats", type=int, default=2, help="cpt / UER-py dup 1 runs on the CLUE file")
    parser.add_argument("--uer-synthetic-mb", default="",
                        help="sizes (MiB) of synthetic corpora to run cpt and UER-py dup_factor 1 on, side by side")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved training rounds (cpt, HF, UER-py)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP/MKL threads of every training process; 0 = torch's default (one per core)")
    parser.add_argument("--soak", action="store_true", help="also run the long memory soak (tiny model)")
    parser.add_argument("--soak-steps", type=int, default=3000)
    parser.add_argument("--profile", action="store_true", help="also profile cpt train with py-spy")
    parser.add_argument("--cpt-variant", action="append", default=None,
                        help="cpt train flags to run beside the default in every training round "
                             "(repeatable; default: '--precision fp32', cpt without bf16 autocast; '' for none)")
    parser.add_argument("--cpt-tree", action="append", default=[], type=Path,
                        help="also time `cpt train` from this source tree in every training round, e.g. a git "
                             "worktree of the commit before a change (repeatable)")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-loader", action="store_true", help="skip the loader / sampler benchmark (~1 min)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default OUT/work, removed after)")
    parser.add_argument("--keep-work", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/run_all.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    started = time.perf_counter()
    uer = optional_uer_side(args.uer_path, args.uer_python, "bench")
    if uer:
        machine["uer_py_revision"] = uer.revision()
    sections: dict[str, str] = {}

    def meta() -> dict:
        return {"finished": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "command": command.strip(),
                "machine": machine}

    def save(name: str, payload: dict) -> dict:
        payload = {**payload, **meta(), "foreign_load": _foreign_load(payload)}
        write_json(args.out / f"{name}.json", payload)
        return payload

    uer_dataset = None
    if not args.skip_data:
        base_tiny = work / "data" / "base-tiny"
        if not (base_tiny / "config.json").exists():
            shutil.rmtree(base_tiny, ignore_errors=True)
            import subprocess

            subprocess.run([venv_bin("cpt"), "init-base", "--preset", "tiny", base_tiny], check=True,
                           capture_output=True)
        sizes = [float(size) for size in args.synthetic_mb.split(",") if size.strip()]
        uer_sizes = [float(size) for size in args.uer_synthetic_mb.split(",") if size.strip()]
        data = data_bench.run(work / "data", base_tiny, uer=uer, synthetic_mb=sizes, repeats=args.data_repeats,
                              uer_synthetic_mb=uer_sizes, log=_log)
        data = save("data" if args.data_repeats else "scaling" if sizes else "data_large", data)
        stamp = report.stamp(data)
        if data["cpt"]:  # --data-repeats 0: only the scaling table
            sections["data"] = stamp + "\n\n" + report.render_data(data)
        if sizes:  # else keep the recorded table; runs up to >= 100 MiB have their own, kept by `make bench`
            sections["scaling-large" if max(sizes) >= 100 else "scaling"] = stamp + "\n\n" + report.render_scaling(data)
        if uer is not None and data["cpt"]:
            sections["uer-data"] = stamp + "\n\n" + report.render_uer_data(data)
        if uer is not None and data["uer_scaling"]:
            sections["uer-data-large"] = stamp + "\n\n" + report.render_uer_scaling(data)
            done = [row for row in data["uer_dup1"] if "error" not in row]
            uer_dataset = Path(done[0]["dataset_path"]) if done else None
    if not args.skip_train:
        train = save("train", train_bench.run(work / "train", uer=uer, uer_dataset=uer_dataset, steps=args.train_steps,
                                              rounds=args.rounds, threads=args.threads, log=_log,
                                              cpt_variants=[flags for flags in (args.cpt_variant or ["--precision fp32"])
                                                            if flags.strip()], cpt_trees=args.cpt_tree))
        stamp = report.stamp(train)
        sections["train"] = stamp + "\n\n" + report.render_train(train)
        if uer is not None:
            sections["uer-train"] = stamp + "\n\n" + report.render_uer_train(train)
    if not args.skip_loader:
        loader = save("loader", loader_bench.run(work / "loader", loader_bench.SHARED / "data" / "clue_small_2500.txt",
                                                 rounds=5, log=_log))
        sections["loader"] = report.stamp(loader) + "\n\n" + report.render_loader(loader)
    if args.profile:
        _log("profile: py-spy on cpt train")
        profile = save("profile", profile_train.run(work / "train", args.out, steps=40, threads=args.threads))
        sections["profile"] = report.stamp(profile) + "\n\n" + report.render_profile(profile)
    if args.soak:
        soaked = save("soak", soak.run(work / "soak", steps=args.soak_steps, threads=args.threads, log=_log))
        sections["soak"] = report.stamp(soaked) + "\n\n" + report.render_soak(soaked)
    if sections:
        sections["machine"] = report.render_machine(meta())
        report.update_docs(args.docs, sections)
    if not args.keep_work and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"done in {(time.perf_counter() - started) / 60:.1f} min; wrote {args.out}/*.json and "
         f"{', '.join(sections)} in {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
