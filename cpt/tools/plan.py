"""`cpt plan` / `cpt run --dry-run`: what a run will cost before GPU time is spent.

Prepares and tokenizes if needed (inside RUN_DIR only), then times a few real training steps on
the device at hand (nothing is saved) and prints: corpus documents / tokens / sequences, tokens
per step, epochs implied by --max-steps, estimated wall time, disk needed vs free on --output,
and the probe's peak memory. `--json` prints the same as one JSON object.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cpt import config as cfg
from cpt.common.files import read_json
from cpt.data.vocab import unk_summary, unk_text

PROBE_WARMUP_STEPS = 1
PROBE_TIMED_STEPS = 3
PROBE_HEAD_STEPS = 2  # timed steps of the head phase (after one untimed), when the check plans one
EVAL_PROBE_SEQUENCES = 32


def plan_run(values: dict[str, Any], *, as_json: bool = False) -> dict:
    from cpt.data.prepare import prepare_corpus
    from cpt.data.replay import check_replay_corpus, prepare_replay, tokenize_replay
    from cpt.data.tokenization import tokenize_corpus
    from cpt.errors import BadInput
    from cpt.training.distributed import setup, teardown

    train_config = cfg.check(cfg.stage_config(cfg.TrainConfig, values))
    prepare_config = cfg.check(cfg.stage_config(cfg.PrepareConfig, values))
    tokenize_config = cfg.check(cfg.stage_config(cfg.TokenizeConfig, values))
    if found := cfg.replay_problems(prepare_config, train_config):
        raise BadInput("; ".join(found))
    if prepare_config.replay_corpus:
        check_replay_corpus(prepare_config)
    prepare_corpus(prepare_config)
    tokenize_corpus(tokenize_config)
    if prepare_config.replay_corpus:
        prepare_replay(prepare_config)
        tokenize_replay(tokenize_config)
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
    """Seconds per step (after a warmup step) of each phase, eval seconds per sequence, the MLM head check
    on a few val sequences, peak memory, model size."""
    from cpt.training.checkpoint import TrainState
    from cpt.training.evaluate import evaluate_split
    from cpt.training.head_warmup import HeadPhaseState, planned_head_steps, run_head_check
    from cpt.training.session import checkpoint_bytes, start_session

    if context.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(context.device)
    probe_started = time.perf_counter()
    session = start_session(config, context)
    eval_sequences = min(len(session.val_set), EVAL_PROBE_SEQUENCES)

    def evaluate() -> dict:
        return evaluate_split(session, session.val_set, max_sequences=eval_sequences)

    # Before any step changes a weight: the eval timing and the head check (as training does at step 0).
    started = time.perf_counter()
    base_metrics = evaluate() if eval_sequences else {"val_mlm_loss": math.nan}
    eval_seconds_per_sequence = (time.perf_counter() - started) / max(eval_sequences, 1)
    head = {"untrained": None, "max_steps": 0 if config.head_warmup == "off" else None, "seconds_per_step": 0.0}
    if eval_sequences:
        check = run_head_check(session, base_metrics["val_mlm_loss"], evaluate)
        head.update(untrained=check.untrained, stored_val_loss=check.stored_val_loss,
                    fresh_val_loss=check.fresh_val_loss,
                    max_steps=planned_head_steps(config.head_warmup, check.untrained, config.max_steps))
    if head["max_steps"]:
        state = TrainState(head=HeadPhaseState(max_steps=head["max_steps"]))
        head["seconds_per_step"] = _time_steps(session, state, PROBE_HEAD_STEPS)
    seconds_per_step = _time_steps(session, TrainState(), PROBE_TIMED_STEPS)
    if context.device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(context.device)
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "device": str(context.device), "precision": session.precision, "micro_batch_size": session.micro_batch_size,
        "seconds_per_step": seconds_per_step, "eval_seconds_per_sequence": eval_seconds_per_sequence,
        "peak_memory_bytes": int(peak_bytes), "checkpoint_bytes": checkpoint_bytes(session.model),
        "probe_seconds": time.perf_counter() - probe_started, "probe_steps": PROBE_WARMUP_STEPS + PROBE_TIMED_STEPS,
        "val_sequences": len(session.val_set), "head_warmup": head,
    }


def _time_steps(session, state, timed_steps: int) -> float:
    """Seconds per step of the phase `state` is in: PROBE_WARMUP_STEPS untimed, then `timed_steps` timed,
    batches from the loop's own feed (as in training). Nothing is saved."""
    from cpt.training.session import batch_feed
    from cpt.training.step import enter_phase, train_step

    phase = enter_phase(session, state)
    session.objective.train()
    with batch_feed(session, state.sampler, steps=PROBE_WARMUP_STEPS + timed_steps) as feed:
        for _ in range(PROBE_WARMUP_STEPS):
            _sums, state.sampler = train_step(session, state, feed.next_step(), phase)
            state.step += 1
        _synchronize(session.context.device)
        started = time.perf_counter()
        for _ in range(timed_steps):
            _sums, state.sampler = train_step(session, state, feed.next_step(), phase)
            state.step += 1
        _synchronize(session.context.device)
    enter_phase(session, type(state)())  # every parameter trainable again
    return (time.perf_counter() - started) / timed_steps


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
    epochs = config.max_steps * config.global_batch_size * (1.0 - config.replay_share) / max(train["sequences"], 1)
    from cpt.training.head_warmup import head_eval_interval

    head = probe.get("head_warmup") or {"max_steps": 0, "seconds_per_step": 0.0}
    head_steps = head["max_steps"] or 0  # the phase's cap: the early stop may end it sooner
    evaluations = config.max_steps // config.eval_interval + 1 + config.max_steps // config.save_interval
    if head_steps:
        evaluations += 1 + head_steps // head_eval_interval(head_steps, config.eval_interval)  # check + head evals
    eval_sequences = min(probe["val_sequences"], config.eval_max_sequences)
    train_seconds = probe["seconds_per_step"] * (config.max_steps - head_steps) + head["seconds_per_step"] * head_steps
    eval_seconds = probe["eval_seconds_per_sequence"] * eval_sequences * evaluations
    weights_bytes = probe["checkpoint_bytes"] // 3
    disk_needed = (config.keep_checkpoints + 1) * probe["checkpoint_bytes"] + 2 * weights_bytes
    free = shutil.disk_usage(run_dir).free
    return {
        "corpus": {"train_documents": corpus["train_docs"], "val_documents": corpus["val_docs"],
                   "train_tokens": train["tokens"], "train_sequences": train["sequences"],
                   "val_sequences": shards["val"]["sequences"]},
        "tokens_per_step": round(tokens_per_step),
        "replay": _replay_plan(config),
        "unk": unk_summary(read_json(run_dir / "shards" / "manifest.json")),  # [UNK] share, --extend-vocab tokens
        "max_steps": config.max_steps,
        "head_warmup_steps": head_steps,
        "head_untrained": head.get("untrained"),
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


def _replay_plan(config: cfg.TrainConfig) -> dict | None:
    """--replay-share: the replay shards' size and the epochs over them the run implies."""
    if not config.replay_share:
        return None
    from cpt.data.replay import replay_shards_dir

    splits = read_json(replay_shards_dir(config.output) / "manifest.json")["splits"]
    replay_sequences = config.max_steps * config.global_batch_size * config.replay_share
    return {"share": config.replay_share, "train_sequences": splits["train"]["sequences"],
            "val_sequences": splits["val"]["sequences"],
            "epochs": round(replay_sequences / max(splits["train"]["sequences"], 1), 2)}


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
    table.add_row("[UNK] share of train tokens", unk_text(plan["unk"]))
    if plan["replay"]:
        replay = plan["replay"]
        table.add_row("replay (--replay-share)", f"{replay['share']:g} of each batch from {replay['train_sequences']:,} "
                      f"train / {replay['val_sequences']:,} val sequences of RUN_DIR/replay/ "
                      f"({replay['epochs']:g} epochs); replay_val_mlm_* at every eval")
    epochs_text = f"{plan['epochs']:g}" + ("  [yellow](more than --max-epochs)[/yellow]" if plan["epoch_warning"] else "")
    table.add_row(f"epochs in {plan['max_steps']:,} steps", epochs_text)
    table.add_row("seconds per step", f"{probe['seconds_per_step']:.3f} on {probe['device']} ({probe['precision']}, "
                  f"micro-batch {probe['micro_batch_size']})")
    table.add_row("MLM head check", _head_text(plan))
    table.add_row("estimated wall time", f"{_hours(plan['estimated_wall_seconds'])} "
                  f"(train {_hours(plan['estimated_train_seconds'])} + eval {_hours(plan['estimated_eval_seconds'])})")
    disk = f"{plan['disk_needed_bytes'] / 2**30:.2f} GiB needed / {plan['disk_free_bytes'] / 2**30:.1f} GiB free"
    table.add_row("disk on --output", disk if plan["disk_ok"] else f"[red]{disk}[/red]")
    table.add_row("peak memory of the probe", f"{probe['peak_memory_bytes'] / 2**30:.2f} GiB")
    table.add_row("probe", f"{probe['probe_steps']} real steps in {probe['probe_seconds']:.1f} s")
    Console().print(table)


def _head_text(plan: dict) -> str:
    head = plan["probe"].get("head_warmup") or {}
    verdict = {True: "untrained", False: "trained", None: "not checked"}[head.get("untrained")]
    if plan["head_warmup_steps"]:
        return (f"{verdict}: head warm-up up to {plan['head_warmup_steps']:,} of the {plan['max_steps']:,} steps "
                f"({head['seconds_per_step']:.3f} s per step)")
    return f"{verdict}: no head warm-up" + (" [yellow](--head-warmup off)[/yellow]" if head.get("untrained") else "")


def _hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
