"""Stage 3, `cpt train --output RUN_DIR --base-model DIR`: continued MLM pretraining, one flat loop.

Reads RUN_DIR/shards/, writes RUN_DIR/checkpoints/step-N/, best.json and metrics.jsonl. Evaluates
the base model at step 0, then every --eval-interval steps and at every checkpoint; best.json
names the checkpoint with the best --best-metric. --resume auto continues exactly from the newest
valid checkpoint (same weights at the end as an uninterrupted run). SIGTERM/SIGINT finish the
step, write a checkpoint and exit 4. Under torchrun it trains with DDP, each rank taking a
contiguous share of every global batch.

Read top to bottom: `train` builds the session (cpt/training/session.py), resumes or evaluates the base,
then `run_steps` loops: one optimizer step (cpt/training/step.py), then as due a metrics line, an
evaluation, a checkpoint (cpt/training/resume.py), a stop for --max-time or a signal (monitor.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from cpt.common.metrics import append_metrics, truncate_metrics
from cpt.common.runtime import StepProgress, info, print_table, warn
from cpt.config import TrainConfig
from cpt.errors import BadInput, Interrupted
from cpt.training import checkpoint as ckpt
from cpt.training.batches import SamplerState
from cpt.training.checkpoint import TrainState
from cpt.training.distributed import DistContext, barrier, broadcast_flags, setup, teardown
from cpt.training.evaluate import evaluate_split, validation_metrics
from cpt.training.head_warmup import after_head_eval, head_eval_interval, run_head_check, start_head_phase
from cpt.training.monitor import Deadline, InFlight, LogWindow, Pace, StopSignal, progress_text, summary_rows
from cpt.training.resume import check_compatible, repair_best_pointer, resume_path, save_and_point
from cpt.training.session import Session, batch_feed, check_free_disk, start_session, warn_about_epochs
from cpt.training.step import Phase, StepSums, enter_phase, train_step


def train(config: TrainConfig) -> dict:
    """Train to --max-steps (or resume there); returns best.json's record."""
    context = setup(config.device)
    try:
        return _train(config, context)
    finally:
        teardown(context)


def _train(config: TrainConfig, context: DistContext) -> dict:
    process_started = time.perf_counter()  # --max-time counts from here: loading the model is part of it
    session = start_session(config, context)
    state, resumed_from = resume_or_start(session)
    describe(session)
    if resumed_from is None:
        state.head.max_steps = evaluate_base_model(session)
    run_steps(session, state, Deadline(config.max_time_s, process_started))
    return finish(session, state)


def run_steps(session: Session, state: TrainState, deadline: Deadline) -> None:
    """Step until --max-steps; after each step, as due: a metrics line, an evaluation, a checkpoint, a stop
    (--max-time, or a signal: checkpoint and exit 4)."""
    config, context = session.config, session.context
    phase = enter_phase(session, state)
    session.objective.train()
    window, in_flight = LogWindow(data_wait_s=0.0), InFlight()
    run_started = time.perf_counter() - state.elapsed_s  # elapsed_s sums every session of the run
    pace = Pace(state.step, state.elapsed_s)
    # The signal handler first: a signal while the loader processes start still ends in a checkpoint.
    with StopSignal() as stop, batch_feed(session, state.sampler, steps=config.max_steps - state.step) as feed, \
            StepProgress(config.max_steps, state.step) as progress:
        while state.step < config.max_steps:
            step_started = time.perf_counter()
            step_phase = phase.name
            sums, next_sampler = checked_step(session, state, feed.next_step(), phase)
            state.step += 1
            state.sampler = next_sampler
            state.elapsed_s = time.perf_counter() - run_started
            in_flight.append(state.step, sums)
            # One all-reduce for both flags: reading it back waits for the step to finish on the device.
            out_of_time, stop_requested = broadcast_flags((deadline.must_stop(), stop.requested), context)
            due = due_after(state, config, out_of_time=out_of_time)
            # Read back the finished steps; this one's too where the window is logged or saved.
            in_flight.read_back(window, state, keep_last=not due.log)
            deadline.observe_step(time.perf_counter() - step_started)
            progress.advance(state.step, window.status(step_phase))

            if due.log:
                entry = window.entry(state, step_phase, feed.wait_s)
                if due.eval:
                    phase = evaluate_into(entry, session, state, phase, deadline, head_eval=due.head_eval)
                log_metrics(session, entry)
                eta_s = pace.eta_s(state.step, state.elapsed_s, step_phase, config.max_steps)
                progress.line(progress_text(entry, config.max_steps, eta_s))
                window = LogWindow(data_wait_s=feed.wait_s)
                if due.save:
                    save(session, phase, state, entry, deadline)
            if due.out_of_time:
                warn(f"--max-time {config.max_time}: stopping at step {state.step} of {config.max_steps} to leave "
                     "time for export; rerun the same command to continue training")
                break
            if stop_requested and not due.last:
                in_flight.read_back(window, state, keep_last=False)
                stop_with_checkpoint(session, phase, state, step_phase, saved=due.save)


@dataclass(frozen=True)
class Due:
    """What follows the step just taken."""

    log: bool  # a metrics line
    eval: bool  # with val metrics
    head_eval: bool  # an evaluation of the head phase's own: it may end the phase
    save: bool  # a checkpoint
    out_of_time: bool  # --max-time: checkpoint and stop
    last: bool  # the step was the run's last


def due_after(state: TrainState, config: TrainConfig, *, out_of_time: bool) -> Due:
    """What the step just taken (state.step) calls for; out_of_time: --max-time's verdict on all ranks."""
    last = state.step == config.max_steps
    out_of_time = out_of_time and not last
    save = state.step % config.save_interval == 0 or last or out_of_time
    # The head phase's own evaluations decide its end; others (--eval/--save-interval, --max-time) only log.
    head_every = head_eval_interval(state.head.max_steps, config.eval_interval)
    head_eval = state.phase == "head" and (state.step % head_every == 0 or state.step >= state.head.max_steps)
    evaluate = state.step % config.eval_interval == 0 or save or head_eval
    log = state.step % config.log_interval == 0 or evaluate
    return Due(log=log, eval=evaluate, head_eval=head_eval, save=save, out_of_time=out_of_time, last=last)


def checked_step(session: Session, state: TrainState, prepared: tuple[list[dict], SamplerState],
                 phase: Phase) -> tuple[StepSums, SamplerState]:
    """train_step, with CUDA running out of memory turned into what to change."""
    try:
        return train_step(session, state, prepared, phase)
    except torch.OutOfMemoryError:
        raise BadInput(
            f"CUDA out of memory at micro-batch {session.micro_batch_size} x {session.seq_length} tokens; "
            "lower --micro-batch-size (or use auto) or add --gradient-checkpointing"
        ) from None


def resume_or_start(session: Session) -> tuple[TrainState, Path | None]:
    """The state to start from and the checkpoint it came from (--resume; None: a fresh start), with model
    and optimizer restored. The main process also drops the metrics a killed run logged past that checkpoint,
    repairs best.json and checks the disk."""
    config, run_dir = session.config, Path(session.config.output)
    state = TrainState()
    resumed_from = resume_path(config, run_dir)
    if resumed_from is not None:
        check_compatible(resumed_from, session.record)
        state = ckpt.load_checkpoint(resumed_from, session.model, None)
        ckpt.load_optimizer(resumed_from, enter_phase(session, state).optimizer)  # the head phase's or the model's
        info(f"train: resumed from {resumed_from} (step {state.step}), {state.phase} phase")
    if session.context.is_main_process:
        if resumed_from is not None:
            repair_best_pointer(run_dir, resumed_from, state.step, config.best_metric)
        ckpt.checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
        truncate_metrics(run_dir, state.step if resumed_from is not None else -1)
        check_free_disk(run_dir, session.model, config.keep_checkpoints)
        warn_about_epochs(config, len(session.train_set))
    return state, resumed_from


def describe(session: Session) -> None:
    """One line: data, model, device, precision and how the global batch is split."""
    config, context, model = session.config, session.context, session.model
    info(
        f"train: {len(session.train_set)} train / {len(session.val_set)} val sequences, {type(model).__name__} "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {context.device} ({session.precision}), "
        f"global batch {config.global_batch_size} = {context.world_size} x {session.accum_steps} x "
        f"{session.micro_batch_size}"
    )


def evaluate_base_model(session: Session) -> int:
    """Step 0: the base model's val metrics and the check of its MLM head, logged; returns the head phase's
    step cap (0: no head phase)."""
    metrics = validation_metrics(session)
    info(f"step 0 (base model): val_mlm_loss {metrics['val_mlm_loss']:.4f}, val_mlm_acc {metrics['val_mlm_acc']:.4f}"
         + (f", replay_val_mlm_loss {metrics['replay_val_mlm_loss']:.4f}" if "replay_val_mlm_loss" in metrics else ""))
    check = run_head_check(session, metrics["val_mlm_loss"], lambda: evaluate_split(session, session.val_set))
    max_head_steps = start_head_phase(session, check)
    log_metrics(session, {"step": 0, "tokens_seen": 0, **metrics, "phase": "base", "head_untrained": check.untrained,
                          "head_fresh_val_mlm_loss": check.fresh_val_loss, "head_warmup_max_steps": max_head_steps})
    return max_head_steps


def evaluate_into(entry: dict, session: Session, state: TrainState, phase: Phase, deadline: Deadline, *,
                  head_eval: bool) -> Phase:
    """Add the val metrics to `entry`; returns the phase of the next step (a head-phase evaluation may end it)."""
    started = time.perf_counter()
    entry.update(validation_metrics(session))
    deadline.observe_eval(time.perf_counter() - started)
    if head_eval and after_head_eval(state.head, state.step, entry["val_mlm_loss"]):
        entry["head_warmup_done"] = True
        info(f"head warm-up done at step {state.step} (val_mlm_loss {entry['val_mlm_loss']:.4f}); "
             f"training the whole model for the {session.config.max_steps - state.step} steps left")
        return enter_phase(session, state)
    return phase


def log_metrics(session: Session, entry: dict) -> None:
    """One metrics.jsonl line (main process)."""
    if session.context.is_main_process:
        append_metrics(session.config.output, entry)


def save(session: Session, phase: Phase, state: TrainState, metrics: dict, deadline: Deadline | None = None) -> None:
    """Checkpoint `state` with the optimizer of `phase` and the evaluation `metrics`; every rank waits for it."""
    started = time.perf_counter()
    if session.context.is_main_process:
        save_and_point(Path(session.config.output), session.model, phase.optimizer, state, session.record,
                       session.config, metrics)
    barrier(session.context)
    if deadline is not None:
        deadline.observe_save(time.perf_counter() - started)


def stop_with_checkpoint(session: Session, phase: Phase, state: TrainState, step_phase: str, *,
                         saved: bool) -> NoReturn:
    """After a signal: checkpoint the step just finished (evaluated, as every checkpoint is) unless that is
    done already, then exit 4."""
    if not saved:
        entry = {"step": state.step, "tokens_seen": state.tokens_seen, "phase": step_phase,
                 **validation_metrics(session)}
        log_metrics(session, entry)
        save(session, phase, state, entry)
    raise Interrupted(f"interrupted at step {state.step}; checkpoint saved, rerun the same command to resume")


def finish(session: Session, state: TrainState) -> dict:
    """Say where training ended and show the val metrics of the base, the best and the last checkpoint."""
    run_dir = Path(session.config.output)
    best = ckpt.best_pointer(run_dir) or {}
    info(f"train: done at step {state.step}; best {best.get('metric')} {best.get('value', float('nan')):.4f} "
         f"at step {best.get('step')}")
    if session.context.is_main_process:
        print_table("validation", ["checkpoint", "val_mlm_loss", "val_mlm_acc"], summary_rows(run_dir, best))
    return best
