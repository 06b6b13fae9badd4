"""What the training loop watches besides the model: signals, the --max-time budget, the sums behind each
metrics line, the progress text and the end-of-training table.

    with StopSignal() as stop: ... stop.requested            # SIGTERM/SIGINT: checkpoint, then exit 4
    deadline.must_stop()                                      # --max-time: one more step might not fit
    in_flight.read_back(window, state, keep_last=True)        # step sums into the log window, one step behind
    entry = window.entry(state, phase, data_wait_s)           # a metrics.jsonl line
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from cpt.common.metrics import evaluated, read_metrics
from cpt.common.runtime import warn
from cpt.errors import BadInput
from cpt.training.checkpoint import TrainState
from cpt.training.step import StepSums


class StopSignal:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit 4. Second: exit at once (4)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.requested:
            raise SystemExit(4)
        self.requested = True
        warn(f"received {signal.Signals(signum).name}: finishing this step, then checkpointing (again to abort)")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Deadline:
    """--max-time: stop when one more step, an eval, a checkpoint and the export might not fit."""

    def __init__(self, budget_s: float | None, started: float):
        self.budget_s, self.started = budget_s, started
        self.step_s = self.eval_s = self.save_s = 0.0

    def observe_step(self, seconds: float) -> None:
        self.step_s = max(self.step_s * 0.9 + seconds * 0.1, seconds) if self.step_s else seconds

    def observe_eval(self, seconds: float) -> None:
        self.eval_s = max(self.eval_s, seconds)

    def observe_save(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)

    def must_stop(self) -> bool:
        if self.budget_s is None:
            return False
        # Export costs about a checkpoint write plus a reload; keep a 2x margin on what we know.
        reserve_s = 2 * (self.step_s + self.eval_s + 2 * self.save_s) + 5.0
        return time.perf_counter() - self.started + reserve_s >= self.budget_s


@dataclass
class LogWindow:
    """Sums over the steps since the last metrics line."""

    data_wait_s: float  # the batch feed's wait total when the window began
    started: float = field(default_factory=time.perf_counter)
    loss_sum: float = 0.0  # summed cross-entropy over the masked tokens, nats
    correct: float = 0.0  # masked tokens predicted right
    masked: float = 0.0  # masked tokens
    tokens: int = 0  # real (non-padding) tokens
    lr: float = 0.0  # of the newest step read back

    def add(self, values: dict) -> None:
        """One step's StepSums.values()."""
        self.loss_sum += values["loss_sum"]
        self.correct += values["correct"]
        self.masked += values["masked"]
        self.tokens += values["tokens"]
        self.lr = values["lr"]

    def status(self, phase: str) -> str:
        """The progress bar's text: the window's mean loss so far."""
        return f"{phase} loss {self.loss_sum / self.masked:.3f}" if self.masked else ""

    def entry(self, state: TrainState, phase: str, data_wait_s: float) -> dict:
        """The metrics.jsonl line for the window ending at `state`; data_wait_s: the feed's wait total now."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        return {
            "step": state.step, "tokens_seen": state.tokens_seen, "lr": self.lr,
            "loss": self.loss_sum / max(self.masked, 1), "mlm_acc": self.correct / max(self.masked, 1),
            "tokens_per_s": self.tokens / seconds,
            "data_wait_share": round(min((data_wait_s - self.data_wait_s) / seconds, 1.0), 4),
            "elapsed_s": round(state.elapsed_s, 3), "phase": phase,
        }


class InFlight:
    """Steps queued on the device whose sums are not read back yet: the loop reads step k's while step k + 1
    runs (cpt.training.step.StepSums)."""

    def __init__(self):
        self.steps: list[tuple[int, StepSums]] = []

    def append(self, step: int, sums: StepSums) -> None:
        self.steps.append((step, sums))

    def read_back(self, window: LogWindow, state: TrainState, *, keep_last: bool) -> None:
        """Add the sums of the steps in flight to the window and the state (all of them, or all but the newest,
        which may still be running); stop on a non-finite loss, naming its step."""
        while len(self.steps) > int(keep_last):
            step, sums = self.steps.pop(0)
            values = sums.values()
            if not math.isfinite(values["loss_sum"]):
                raise BadInput(f"training diverged at step {step} (loss {values['loss_sum']}); lower --lr "
                               "or resume from an earlier checkpoint")
            state.tokens_seen += values["tokens"]
            window.add(values)


class Pace:
    """The time left, at the pace of the current phase: head steps (no backward through the encoder) cost a
    fraction of a full step, so a run-wide average after a head phase promised too early an end, and during
    it the ETA is only a lower bound (shown as "eta >")."""

    def __init__(self, step: int, elapsed_s: float):
        self.phase: str | None = None
        self.origin = self.last = (step, elapsed_s)  # (step, run elapsed s) where the phase's pace starts

    def eta_s(self, step: int, elapsed_s: float, phase: str, max_steps: int) -> float:
        if phase != self.phase:
            self.phase, self.origin = phase, self.last if self.phase is not None else self.origin
        self.last = (step, elapsed_s)
        origin_step, origin_s = self.origin
        return (elapsed_s - origin_s) / max(step - origin_step, 1) * (max_steps - step)


def progress_text(entry: dict, max_steps: int, eta_s: float) -> str:
    """The log line of a metrics entry, with the time left (Pace.eta_s)."""
    step, phase = entry["step"], entry.get("phase", "full")
    bound = ">" if phase == "head" else ""
    text = (f"step {step}/{max_steps} ({phase})  loss {entry['loss']:.4f}  "
            f"acc {entry['mlm_acc']:.4f}  lr {entry['lr']:.2e}  "
            f"{entry['tokens_per_s']:.0f} tok/s  eta {bound}{eta_s / 60:.1f} min")
    if "val_mlm_acc" in entry:
        text += f"  val_loss {entry['val_mlm_loss']:.4f}  val_acc {entry['val_mlm_acc']:.4f}"
    if "replay_val_mlm_loss" in entry:
        text += f"  replay_val_loss {entry['replay_val_mlm_loss']:.4f}"
    return text


def summary_rows(run_dir: Path, best: dict) -> list[list[str]]:
    """Rows of the end-of-training table: val metrics at step 0 (the base), at the best and the last step."""
    lines = evaluated(read_metrics(run_dir))
    if not lines:
        return []
    picks = [("step 0 (base)", lines[0]), (f"best: step {best.get('step')}",
             next((m for m in lines if m["step"] == best.get("step")), lines[-1])),
             (f"last: step {lines[-1]['step']}", lines[-1])]
    return [[name, f"{m['val_mlm_loss']:.4f}", f"{m['val_mlm_acc']:.4f}"] for name, m in picks]
