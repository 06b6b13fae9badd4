"""`cpt plan` / `cpt run --dry-run`: what a run will cost before GPU time is spent.

Prepares and tokenizes if needed (inside RUN_DIR only), then times a few real training steps on
the device at hand (nothing is saved) and prints: corpus documents / tokens / sequences, tokens
per step, epochs implied by --max-steps, estimated wall time, disk needed vs free on --output,
and the probe's peak memory. `--json` prints the same as one JSON object.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cpt import config as cfg
from cpt.manifest import read_json

PROBE_WARMUP_STEPS = 1
PROBE_TIMED_STEPS = 3
EVAL_PROBE_SEQUENCES = 32


def plan_run(values: dict[str, Any], *, as_json: bool = False) -> dict:
    from cpt.distributed import setup, teardown
    from cpt.prepare import prepare_corpus
    from cpt.tokenization import tokenize_corpus

    train_config = cfg.check(cfg.stage_config(cfg.TrainConfig, values))
    prepare_corpus(cfg.check(cfg.stage_config(cfg.PrepareConfig, values)))
    tokenize_corpus(cfg.check(cfg.stage_config(cfg.TokenizeConfig, values)))
    context = setup(train_config.device)
    try:
        probe = probe_training(train_config, context)
    finally:
        teardown(context)
    plan = compute_plan(train_config, probe)
    if as_json:
        print(json.dumps(plan, indent=2))
    else:
        print_plan(plan)
    return plan


def probe_training(config: cfg.TrainConfig, context) -> dict:
    """Seconds per step (after a warmup step), eval seconds per sequence, peak memory, model size."""
    from cpt.checkpoint import TrainState
    from cpt.evaluate import evaluate_mlm
    from cpt.train import batch_feed, checkpoint_bytes, start_session, train_step

    if context.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(context.device)
    probe_started = time.perf_counter()
    session = start_session(config, context)
    state = TrainState()
    session.objective.train()
    with batch_feed(session, state.sampler, steps=PROBE_WARMUP_STEPS + PROBE_TIMED_STEPS) as feed:  # as in training
        for _ in range(PROBE_WARMUP_STEPS):
            _sums, state.sampler = train_step(session, state, feed.next_step())
            state.step += 1
        _synchronize(context.device)
        started = time.perf_counter()
        for _ in range(PROBE_TIMED_STEPS):
            _sums, state.sampler = train_step(session, state, feed.next_step())
            state.step += 1
        _synchronize(context.device)
    seconds_per_step = (time.perf_counter() - started) / PROBE_TIMED_STEPS
    eval_sequences = min(len(session.val_set), EVAL_PROBE_SEQUENCES)
    started = time.perf_counter()
    if eval_sequences:
        evaluate_mlm(session.objective, session.val_set, session.spec, seed=config.seed, max_sequences=eval_sequences,
                     micro_batch_size=session.micro_batch_size, context=context, autocast=session.autocast,
                     max_width=session.seq_length)
    eval_seconds_per_sequence = (time.perf_counter() - started) / max(eval_sequences, 1)
    if context.device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(context.device)
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "device": str(context.device), "precision": session.precision, "micro_batch_size": session.micro_batch_size,
        "seconds_per_step": seconds_per_step, "eval_seconds_per_sequence": eval_seconds_per_sequence,
        "peak_memory_bytes": int(peak_bytes), "checkpoint_bytes": checkpoint_bytes(session.model),
        "probe_seconds": time.perf_counter() - probe_started, "probe_steps": PROBE_WARMUP_STEPS + PROBE_TIMED_STEPS,
        "val_sequences": len(session.val_set),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_plan(config: cfg.TrainConfig, probe: dict) -> dict:
    """Pure arithmetic over the manifests and the probe's timings."""
    run_dir = Path(config.output)
    corpus = read_json(run_dir / "corpus" / "manifest.json")["counts"]
    shards = read_json(run_dir / "shards" / "manifest.json")["splits"]
    train = shards["train"]
    mean_sequence_tokens = train["tokens"] / max(train["sequences"], 1)
    tokens_per_step = config.global_batch_size * mean_sequence_tokens
    epochs = config.max_steps * config.global_batch_size / max(train["sequences"], 1)
    evaluations = config.max_steps // config.eval_interval + 1 + config.max_steps // config.save_interval
    eval_sequences = min(probe["val_sequences"], config.eval_max_sequences)
    train_seconds = probe["seconds_per_step"] * config.max_steps
    eval_seconds = probe["eval_seconds_per_sequence"] * eval_sequences * evaluations
    weights_bytes = probe["checkpoint_bytes"] // 3
    disk_needed = (config.keep_checkpoints + 1) * probe["checkpoint_bytes"] + 2 * weights_bytes
    free = shutil.disk_usage(run_dir).free
    return {
        "corpus": {"train_documents": corpus["train_docs"], "val_documents": corpus["val_docs"],
                   "train_tokens": train["tokens"], "train_sequences": train["sequences"],
                   "val_sequences": shards["val"]["sequences"]},
        "tokens_per_step": round(tokens_per_step),
        "max_steps": config.max_steps,
        "epochs": round(epochs, 2),
        "epoch_warning": epochs > config.max_epochs,
        "estimated_wall_seconds": round(train_seconds + eval_seconds),
        "estimated_train_seconds": round(train_seconds),
        "estimated_eval_seconds": round(eval_seconds),
        "disk_needed_bytes": disk_needed,
        "disk_free_bytes": free,
        "disk_ok": free >= disk_needed,
        "probe": probe,
    }


def print_plan(plan: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    probe = plan["probe"]
    table = Table(title="cpt plan", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    corpus = plan["corpus"]
    table.add_row("documents (train / val)", f"{corpus['train_documents']:,} / {corpus['val_documents']:,}")
    table.add_row("train tokens / sequences", f"{corpus['train_tokens']:,} / {corpus['train_sequences']:,}")
    table.add_row("tokens per step", f"{plan['tokens_per_step']:,}")
    epochs_text = f"{plan['epochs']:g}" + ("  [yellow](more than --max-epochs)[/yellow]" if plan["epoch_warning"] else "")
    table.add_row(f"epochs in {plan['max_steps']:,} steps", epochs_text)
    table.add_row("seconds per step", f"{probe['seconds_per_step']:.3f} on {probe['device']} ({probe['precision']}, "
                  f"micro-batch {probe['micro_batch_size']})")
    table.add_row("estimated wall time", f"{_hours(plan['estimated_wall_seconds'])} "
                  f"(train {_hours(plan['estimated_train_seconds'])} + eval {_hours(plan['estimated_eval_seconds'])})")
    disk = f"{plan['disk_needed_bytes'] / 2**30:.2f} GiB needed / {plan['disk_free_bytes'] / 2**30:.1f} GiB free"
    table.add_row("disk on --output", disk if plan["disk_ok"] else f"[red]{disk}[/red]")
    table.add_row("peak memory of the probe", f"{probe['peak_memory_bytes'] / 2**30:.2f} GiB")
    table.add_row("probe", f"{probe['probe_steps']} real steps in {probe['probe_seconds']:.1f} s")
    Console().print(table)


def _hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
