"""In-process CPU benchmark of training-step variants of `cpt train`: what stock dropout, the cheap
dropout (cpt/training/cpu.py), bf16 autocast and torch.compile each cost per step.

    python bench/experiments/step_variants.py [--rounds 6] [--steps 3] [--warmup 3] [--threads 1] [--compile]
                                  [--variants fp32,bf16,...] [--out bench/out/step_variants.json]

Model: BERT 4 layers / hidden 256 / 4 heads / FFN 1024, vocab 21128, random weights
(`cpt init-base --preset small`, made once under --work), loaded with cpt's load_mlm_model (SDPA
attention, fp32 weights). Data: fixed seeded random batches of 16 full 128-token sequences, ~15% of
the positions (never [CLS]) masked. One step is cpt's train_step on one micro-batch: masked_lm_loss
(prediction head on masked positions only) under the variant's autocast, backward of the mean loss,
clip_grad_norm_(1.0), fused AdamW over cpt's parameter groups, zero_grad; the global RNG is reseeded
per step, so every variant draws the same dropout seeds.

Variants (all built from the same weights; fp32 is the reference):
  fp32             stock nn.Dropout, SDPA, fp32 (cpt train on CPU before the cheap dropout)
  bf16             bf16 autocast (cpt.training.session.autocast_for), stock dropout
  fp32_fastdrop    cpt.training.cpu.use_fast_dropout, fp32
  bf16_fastdrop    cheap dropout + bf16 autocast with bf16 activations between layers: what `cpt train` does
                   by default on CPUs with AMX/AVX512-BF16
  no_attn_dropout  fp32, stock dropout but none on the attention probabilities (information only: SDPA's fused
                   CPU kernel then applies; cpt does not train this way)
  compile_bf16     torch.compile of the encoder (static shapes) + bf16 autocast, stock dropout (--compile: slow)

Variants run interleaved (fp32, bf16, ..., fp32, bf16, ... for --rounds rounds of --steps steps each),
because this machine is shared and its speed drifts; warm-up steps (and compilation) come before the
first round. Reported: median CPU seconds (time.process_time) and wall seconds per step, and per round
the ratio fp32 / variant of the round's median CPU seconds (> 1 = faster than fp32) with the median
of those ratios. CPU seconds are the figure to trust on a loaded machine; at --threads 1 they track
the wall time of an idle one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for harness
from harness import REPO, machine_info, write_json  # noqa: E402

from cpt.training.cpu import cpu_has_native_bf16, keep_cpu_activations_in_bf16, reuse_freed_memory, use_fast_dropout
from cpt.training.model import IGNORE_INDEX, init_base, load_mlm_model, masked_lm_loss, parameter_groups
from cpt.training.session import autocast_for

VOCAB = 21128
BATCH, SEQ = 16, 128
MASK_PROB = 0.15
CLS_ID, MASK_ID, FIRST_WORD_ID = 101, 103, 106  # zh_vocab.txt: [CLS], [MASK], first ordinary token
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-4, 0.01, 1.0  # cpt train's defaults
REFERENCE = "fp32"

# name: (precision for autocast_for, cheap dropout, attention dropout kept, torch.compile)
VARIANTS = {
    "fp32": {"precision": "fp32", "fast_dropout": False, "attention_dropout": True, "compile": False},
    "bf16": {"precision": "bf16", "fast_dropout": False, "attention_dropout": True, "compile": False},
    "fp32_fastdrop": {"precision": "fp32", "fast_dropout": True, "attention_dropout": True, "compile": False},
    "bf16_fastdrop": {"precision": "bf16", "fast_dropout": True, "attention_dropout": True, "compile": False},
    "no_attn_dropout": {"precision": "fp32", "fast_dropout": False, "attention_dropout": False, "compile": False},
    "compile_bf16": {"precision": "bf16", "fast_dropout": False, "attention_dropout": True, "compile": True},
}
DEFAULT_VARIANTS = ("fp32", "bf16", "fp32_fastdrop", "bf16_fastdrop", "no_attn_dropout")


def ensure_base(work: Path) -> Path:
    """The small random base model (`cpt init-base --preset small`, seed 0), made once."""
    base = work / "base-small"
    if not (base / "config.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        init_base(base, preset="small", seed=0)
    return base


def make_batches(count: int, seed: int = 1) -> list[dict]:
    """`count` batches of BATCH full SEQ-token sequences; MASK_PROB of the positions after [CLS] -> [MASK]."""
    generator = torch.Generator().manual_seed(seed)
    masked_per_row = round(MASK_PROB * SEQ)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(FIRST_WORD_ID, VOCAB, (BATCH, SEQ), generator=generator)
        input_ids[:, 0] = CLS_ID
        labels = torch.full((BATCH, SEQ), IGNORE_INDEX)
        for row in range(BATCH):
            positions = torch.randperm(SEQ - 1, generator=generator)[:masked_per_row] + 1
            labels[row, positions] = input_ids[row, positions]
            input_ids[row, positions] = MASK_ID
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
                        "labels": labels})
    return batches


def drop_attention_dropout(model: torch.nn.Module) -> int:
    """Set every self-attention's dropout to 0 (BERT passes `self.dropout.p` to SDPA); returns how many."""
    changed = 0
    for name, module in model.named_modules():
        if name.endswith("attention.self.dropout") and isinstance(module, torch.nn.Dropout):
            module.p = 0.0
            changed += 1
    if not changed:
        raise RuntimeError("no attention.self.dropout module found: has transformers' BERT layout changed?")
    model.config.attention_probs_dropout_prob = 0.0
    return changed


class Variant:
    """One model + optimizer trained the way `name` says, on the shared fixed batches."""

    def __init__(self, name: str, base: Path, batches: list[dict]):
        options = VARIANTS[name]
        self.name = name
        self.model = load_mlm_model(base, "cpu")
        self.model.train()
        if not options["attention_dropout"]:
            drop_attention_dropout(self.model)
        if options["fast_dropout"]:  # as cpt.training.session.start_session does on CPU
            use_fast_dropout(self.model)
            keep_cpu_activations_in_bf16(self.model)  # acts under bf16 autocast only
        if options["compile"]:
            # cpt.training.session.compile_model compiles the same module with dynamic=None: static for fixed shapes too
            self.model.base_model.compile(dynamic=False)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, WEIGHT_DECAY), lr=LR, betas=(0.9, 0.999),
                                           eps=1e-6, fused=True)
        self.autocast, self.precision = autocast_for(torch.device("cpu"), options["precision"])
        self.batches = batches
        self.count = 0
        self.cpu_s: list[float] = []
        self.wall_s: list[float] = []
        self.setup: dict = {}

    def step(self) -> float:
        """One training step (as cpt.training.step.train_step for a single micro-batch); returns the mean loss."""
        batch = self.batches[self.count % len(self.batches)]
        torch.manual_seed(1000 + self.count)  # same dropout seeds for every variant at the same step
        with self.autocast:
            loss_sum, _correct, count = masked_lm_loss(self.model, **batch)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.count += 1
        return float(loss_sum.detach()) / int(count)

    def timed_step(self) -> tuple[float, float, float]:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        loss = self.step()
        return time.process_time() - cpu0, time.perf_counter() - wall0, loss


def build(names: list[str], base: Path, warmup: int, log=print) -> list[Variant]:
    batches = make_batches(8)
    variants = []
    for name in names:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        variant = Variant(name, base, batches)
        warm = max(warmup, 2) if VARIANTS[name]["compile"] else warmup  # compiles forward, then backward
        walls, loss = [], None
        for _ in range(warm):
            _cpu, wall, loss = variant.timed_step()
            walls.append(round(wall, 3))
        variant.setup = {"precision": variant.precision, "warmup_steps": warm, "warmup_wall_s": walls,
                         "setup_cpu_s": round(time.process_time() - cpu0, 2),
                         "setup_wall_s": round(time.perf_counter() - wall0, 2),
                         "loss_after_warmup": None if loss is None else round(loss, 4)}
        log(f"[setup] {name}: {variant.setup}")
        variants.append(variant)
    return variants


def measure(variants: list[Variant], rounds: int, steps: int, log=print) -> dict[str, list[tuple[float, float]]]:
    """Interleaved rounds; per variant and round: (median CPU s/step, median wall s/step)."""
    per_round: dict[str, list[tuple[float, float]]] = {variant.name: [] for variant in variants}
    for index in range(rounds):
        for variant in variants:
            cpus, walls = [], []
            for _ in range(steps):
                cpu, wall, _loss = variant.timed_step()
                cpus.append(cpu)
                walls.append(wall)
            variant.cpu_s.extend(cpus)
            variant.wall_s.extend(walls)
            per_round[variant.name].append((statistics.median(cpus), statistics.median(walls)))
        log(f"[round {index + 1}/{rounds}] CPU s/step: "
            + "  ".join(f"{name}={values[-1][0]:.3f}" for name, values in per_round.items()))
    return per_round


def summarize(variants: list[Variant], per_round: dict[str, list[tuple[float, float]]]) -> dict:
    reference = per_round[REFERENCE]
    summary = {}
    for variant in variants:
        rows = per_round[variant.name]
        cpu_ratios = [ref[0] / own[0] for ref, own in zip(reference, rows, strict=True)]
        wall_ratios = [ref[1] / own[1] for ref, own in zip(reference, rows, strict=True)]
        summary[variant.name] = {
            "cpu_s_per_step": round(statistics.median(variant.cpu_s), 4),
            "wall_s_per_step": round(statistics.median(variant.wall_s), 4),
            "cpu_speedup_vs_fp32": round(statistics.median(cpu_ratios), 3),
            "wall_speedup_vs_fp32": round(statistics.median(wall_ratios), 3),
            "cpu_speedup_vs_fp32_per_round": [round(x, 3) for x in cpu_ratios],
            "wall_speedup_vs_fp32_per_round": [round(x, 3) for x in wall_ratios],
            "round_cpu_s_per_step": [round(cpu, 4) for cpu, _wall in rows],
            "round_wall_s_per_step": [round(wall, 4) for _cpu, wall in rows],
            "step_cpu_s": [round(x, 4) for x in variant.cpu_s],
            "step_wall_s": [round(x, 4) for x in variant.wall_s],
            **variant.setup,
        }
    return summary


def markdown_table(summary: dict) -> str:
    lines = ["| variant | CPU s/step | wall s/step | speed-up vs fp32, CPU (median of rounds) | speed-up, wall "
             "| per-round CPU speed-ups |",
             "|---|---:|---:|---:|---:|---|"]
    for name, row in summary.items():
        rounds = " ".join(f"{x:.2f}" for x in row["cpu_speedup_vs_fp32_per_round"])
        lines.append(f"| {name} | {row['cpu_s_per_step']:.3f} | {row['wall_s_per_step']:.3f} "
                     f"| {row['cpu_speedup_vs_fp32']:.2f}x | {row['wall_speedup_vs_fp32']:.2f}x | {rounds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}; fp32 (the reference) is always run first")
    parser.add_argument("--compile", action="store_true", help="also run compile_bf16 (compilation takes minutes)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first round")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "work" / "step_variants")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "step_variants.json")
    args = parser.parse_args()
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.compile and "compile_bf16" not in names:
        names.append("compile_bf16")
    names = [REFERENCE, *dict.fromkeys(name for name in names if name != REFERENCE)]
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--rounds, --steps and --threads must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # process-wide, as in `cpt train` on CPU: every variant gets it
    base = ensure_base(args.work)
    native_bf16 = cpu_has_native_bf16()
    print(f"threads {torch.get_num_threads()}, batch {BATCH} x {SEQ}, CPU bf16 in hardware: {native_bf16}", flush=True)
    variants = build(names, base, args.warmup, log=lambda text: print(text, flush=True))
    per_round = measure(variants, args.rounds, args.steps, log=lambda text: print(text, flush=True))
    summary = summarize(variants, per_round)
    print(f"\nthreads {args.threads}, {args.rounds} rounds x {args.steps} steps, warm-up {args.warmup}; "
          "speed-up = fp32 s/step / variant s/step per round (> 1 = faster)\n")
    print(markdown_table(summary))
    payload = {
        "settings": {"layers": 4, "hidden": 256, "heads": 4, "intermediate": 1024, "vocab": VOCAB, "batch": BATCH,
                     "seq_length": SEQ, "mask_prob": MASK_PROB, "lr": LR, "weight_decay": WEIGHT_DECAY,
                     "grad_clip": GRAD_CLIP, "rounds": args.rounds, "steps_per_round": args.steps,
                     "warmup_steps": args.warmup, "threads": args.threads, "variants": names,
                     "reference": REFERENCE, "cpu_native_bf16": native_bf16,
                     "command": " ".join(["python", "bench/experiments/step_variants.py", *sys.argv[1:]])},
        "variants": {name: {**VARIANTS[name]} for name in names},
        "summary": summary,
        "machine": machine_info(),
    }
    write_json(args.out, payload)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
