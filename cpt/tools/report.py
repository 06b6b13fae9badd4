"""The run report: RUN_DIR/report.md and RUN_DIR/curves.png, from the files the stages left.

    write_report(Path("run"))        # what `cpt run` does at the end; `cpt report RUN_DIR` regenerates

Reads corpus/manifest.json, shards/manifest.json, metrics.jsonl, best.json, the newest checkpoint's
state.json (the train settings: its full TrainConfig) and export.json; writes nothing else into the run dir.
report.md holds the settings, data statistics, validation metrics at step 0 (the base model) and at
the best checkpoint, throughput, wall time and where the model is. curves.png plots train loss,
val loss and val accuracy against the step (matplotlib's Agg canvas: no display needed). When
tensorboard is importable, RUN_DIR/tensorboard/ gets the same scalars as event files (else skipped).
Every file is written to a temp name and renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from pathlib import Path
from typing import Any

from cpt.common.files import atomic_dir, read_json, write_bytes_atomic
from cpt.common.metrics import merged_by_step, metrics_path
from cpt.common.metrics import read_metrics as read_metrics_lines
from cpt.data.vocab import unk_summary, unk_text
from cpt.errors import BadInput

REPORT_NAME = "report.md"
CURVES_NAME = "curves.png"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl merged by step (a checkpoint line after an interrupt adds to its step), sorted."""
    path = metrics_path(run_dir)
    if not path.is_file():
        raise BadInput(f"{path} is missing; train first (`cpt train` or `cpt run`) before asking for a report")
    merged = merged_by_step(read_metrics_lines(run_dir))
    if not merged:
        raise BadInput(f"{path} holds no metrics; train first (`cpt train` or `cpt run`)")
    return merged


def summarize_run(run_dir: Path, metrics: list[dict]) -> dict[str, Any]:
    """Everything report.md shows, as plain data."""
    from cpt.training import checkpoint as ckpt

    run_dir = Path(run_dir)
    evaluated = [m for m in metrics if "val_mlm_loss" in m]
    trained = [m for m in metrics if "loss" in m]
    base = next((m for m in evaluated if m["step"] == 0), None)
    best = read_json(run_dir / "best.json")
    best_entry = next((m for m in evaluated if best and m["step"] == best.get("step")), None)
    valid = ckpt.valid_checkpoints(run_dir)
    run_record = ckpt.read_checkpoint_record(valid[-1][1]).get("run", {}) if valid else {}
    last = metrics[-1]
    elapsed_s = max((m.get("elapsed_s", 0.0) for m in metrics), default=0.0)
    rates = [m["tokens_per_s"] for m in trained if m.get("tokens_per_s")]
    export = read_json(run_dir / "export.json")
    model_dir = run_dir / "model"
    return {
        "run_dir": str(run_dir),
        "base": base,
        "best": best,
        "best_entry": best_entry,
        "last_eval": evaluated[-1] if evaluated else None,
        "last_step": last["step"],
        "tokens_seen": max((m.get("tokens_seen", 0) for m in metrics), default=0),
        "elapsed_s": elapsed_s,
        "median_tokens_per_s": statistics.median(rates) if rates else None,
        "peak_lr": max((m["lr"] for m in trained if "lr" in m and m.get("phase") != "head"), default=None),
        "run_record": {key: value for key, value in run_record.items()
                       if key not in ("metrics", "shards", "replay_shards", "config")},
        "train_config": run_record.get("config"),  # the full TrainConfig (checkpoints from before it: None)
        "head_check": read_json(run_dir / "head_check.json"),
        "head_warmup_end_step": next((m["step"] for m in metrics if m.get("head_warmup_done")), None),
        "corpus": read_json(run_dir / "corpus" / "manifest.json"),
        "shards": read_json(run_dir / "shards" / "manifest.json"),
        "replay_shards": read_json(run_dir / "replay" / "shards" / "manifest.json") if "replay_share" in run_record
        else None,
        "checkpoints": [path.name for _step, path in valid],
        "export": export,
        "model_dir": str(model_dir) if model_dir.is_dir() else None,
    }


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _metric_rows(summary: dict) -> list[str]:
    """Val metrics at step 0, best and last; with --replay-share also on the replay val split (forgetting)."""
    replay = any("replay_val_mlm_loss" in (entry or {}) for entry in (summary["base"], summary["last_eval"]))
    rows = ["| | step | val_mlm_loss | val_mlm_acc |" + (" replay_val_mlm_loss | replay_val_mlm_acc |" if replay else ""),
            "|---|---:|---:|---:|" + ("---:|---:|" if replay else "")]
    for label, entry in (("base model (step 0)", summary["base"]),
                         (f"best checkpoint ({(summary['best'] or {}).get('metric', 'best.json')})", summary["best_entry"]),
                         ("last evaluation", summary["last_eval"])):
        if entry is not None:
            rows.append(f"| {label} | {entry['step']:,} | {_number(entry['val_mlm_loss'])} | "
                        f"{_number(entry['val_mlm_acc'])} |" + (
                            f" {_number(entry.get('replay_val_mlm_loss', math.nan))} | "
                            f"{_number(entry.get('replay_val_mlm_acc', math.nan))} |" if replay else ""))
    return rows


def _change_line(summary: dict) -> str | None:
    base, best = summary["base"], summary["best_entry"]
    if not base or not best:
        return None
    line = (f"From the base model to the best checkpoint: val_mlm_acc {base['val_mlm_acc']:.4f} -> "
            f"{best['val_mlm_acc']:.4f} ({best['val_mlm_acc'] - base['val_mlm_acc']:+.4f}), val_mlm_loss "
            f"{base['val_mlm_loss']:.4f} -> {best['val_mlm_loss']:.4f} ({best['val_mlm_loss'] - base['val_mlm_loss']:+.4f}).")
    if "replay_val_mlm_loss" in base and "replay_val_mlm_loss" in best:
        change = best["replay_val_mlm_loss"] - base["replay_val_mlm_loss"]
        line += (f" On the replay val split (general text): replay_val_mlm_loss {base['replay_val_mlm_loss']:.4f} -> "
                 f"{best['replay_val_mlm_loss']:.4f} ({change:+.4f}{', forgetting' if change > 0 else ''}).")
    return line


def _inline(values: dict) -> str:
    def show(value: Any) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{key} {show(item)}" for key, item in value.items())
        return '""' if value == "" else str(value)

    return "; ".join(f"{key} `{show(value)}`" for key, value in values.items())


def _settings_lines(summary: dict) -> list[str]:
    """The train settings of the newest checkpoint (all of them, or the few that checkpoints written before
    cpt recorded the full config hold), then tokenize's and prepare's from their manifests."""
    lines = []
    record = summary["run_record"]
    if summary["train_config"]:
        lines.append(f"- train: {_inline(dict(sorted(summary['train_config'].items())))}")
    else:
        train = {key: record[key] for key in ("masking", "mask_prob", "global_batch_size", "seed") if key in record}
        if summary["peak_lr"] is not None:
            train["peak lr (logged)"] = f"{summary['peak_lr']:.3g}"
        if train:
            lines.append(f"- train: {_inline(train)}")
    for stage, manifest in (("tokenize", summary["shards"]), ("prepare", summary["corpus"])):
        if manifest and manifest.get("settings"):
            lines.append(f"- {stage}: {_inline(dict(sorted(manifest['settings'].items())))}")
    if "tokenizer_sha256" in record:
        lines.append(f"- tokenizer sha256: `{record['tokenizer_sha256'][:16]}…`")
    if "cpt_version" in record:
        lines.append(f"- trained with cpt {record['cpt_version']}")
    return lines


def _data_lines(summary: dict) -> list[str]:
    lines = []
    corpus = summary["corpus"]
    if corpus:
        counts = corpus.get("counts", {})
        for record in corpus.get("inputs", []):
            lines.append(f"- input `{record['path']}` ({record['bytes']:,} bytes)")
        lines.append(f"- documents: {_number(counts.get('read_docs'))} read, {_number(counts.get('train_docs'))} train, "
                     f"{_number(counts.get('val_docs'))} val; {_number(counts.get('duplicates'))} duplicates and "
                     f"{_number(counts.get('dropped_short', 0) + counts.get('dropped_empty', 0))} too short dropped")
        lines.append(f"- characters: {_number(counts.get('train_chars'))} train, {_number(counts.get('val_chars'))} val")
    else:
        lines.append("- corpus/manifest.json: not found (prepare has not run here)")
    shards = summary["shards"]
    if shards:
        for split in ("train", "val"):
            stats = shards.get("splits", {}).get(split)
            if stats:
                lines.append(f"- {split} shards: {stats['sequences']:,} sequences, {stats['tokens']:,} tokens, "
                             f"[UNK] {stats['unk_share']:.2%}, {stats['mean_word_tokens']:.2f} tokens per word")
        if shards.get("vocab_extension"):
            lines.append(f"- [UNK] share of train tokens (--extend-vocab): {unk_text(unk_summary(shards))}")
    else:
        lines.append("- shards/manifest.json: not found (tokenize has not run here)")
    replay = summary.get("replay_shards")
    if replay:
        train, val = replay["splits"]["train"], replay["splits"]["val"]
        lines.append(f"- replay (--replay-share {summary['run_record'].get('replay_share')}): {train['sequences']:,} "
                     f"train / {val['sequences']:,} val sequences, {train['tokens']:,} train tokens in "
                     "replay/shards; its val loss is replay_val_mlm_loss")
    return lines


def _head_lines(summary: dict) -> list[str]:
    """What the step-0 MLM head check found and what the head warm-up did (cpt/training/head_warmup.py)."""
    check = summary["head_check"]
    if not check:
        return []
    verdict = "untrained" if check["untrained"] else "trained"
    lines = [f"- MLM head of the base, checked at step 0: **{verdict}** ({check['reason']})"]
    cap, end = check.get("head_warmup_max_steps", 0), summary["head_warmup_end_step"]
    if cap:
        how = (f"steps 1-{end} (of up to {cap}; {'its cap' if end >= cap else 'val loss stopped improving'})"
               if end else f"up to {cap} steps, still running")
        lines.append(f"- head warm-up: {how}, head alone at lr {check['head_warmup_lr']:g}"
                     f"{', re-initialised first' if check.get('reinitialised') else ''}; encoder and embeddings "
                     "frozen; then the whole model")
    elif check["untrained"]:
        lines.append("- head warm-up: off (--head-warmup off), although the head is untrained")
    return lines


def render_markdown(summary: dict) -> str:
    run_name = Path(summary["run_dir"]).name or summary["run_dir"]
    out = [f"# cpt run report: {run_name}", "",
           f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from the files in `{summary['run_dir']}`; "
           f"`cpt report {summary['run_dir']}` rewrites it.", "", "## Result", ""]
    out += _metric_rows(summary)
    change = _change_line(summary)
    out += ["", change] if change else []
    out += ["", f"![train loss, val loss and val accuracy by step]({CURVES_NAME})", ""]
    if summary["model_dir"]:
        exported = (summary["export"] or {}).get("request", {}).get("checkpoint", "?")
        out.append(f"Model: `{summary['model_dir']}` (exported from checkpoint {exported}); a Hugging Face dir that "
                   "replaces the base model.")
    else:
        out.append("Model: not exported yet; run `cpt export --output RUN_DIR --base-model DIR` (or `cpt run`).")
    if summary["best"]:
        out.append(f"Best checkpoint: `checkpoints/{summary['best'].get('checkpoint')}`; kept: "
                   f"{', '.join(summary['checkpoints']) or 'none'}.")
    out += ["", "## Training", ""]
    out.append(f"- steps: {summary['last_step']:,}; tokens seen: {summary['tokens_seen']:,} (non-padding)")
    out.append(f"- wall time in training: {_duration(summary['elapsed_s'])} ({summary['elapsed_s']:.0f} s, "
               "evaluations included, summed over resumed sessions)")
    if summary["median_tokens_per_s"]:
        overall = summary["tokens_seen"] / max(summary["elapsed_s"], 1e-9)
        out.append(f"- throughput: {summary['median_tokens_per_s']:,.0f} tokens/s (median of logged windows), "
                   f"{overall:,.0f} tokens/s over the whole run")
    out += _head_lines(summary)
    out += ["", "## Settings", ""] + (_settings_lines(summary) or ["- (no settings recorded)"])
    out += ["", "## Data", ""] + _data_lines(summary) + [""]
    return "\n".join(out)


def plot_curves(metrics: list[dict], best_step: int | None, path: Path) -> Path:
    """Train loss, val loss and val accuracy against the step, side by side; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(13, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    panels = (("loss", "train loss (masked tokens)", "tab:blue"), ("val_mlm_loss", "val loss", "tab:orange"),
              ("val_mlm_acc", "val accuracy", "tab:green"))
    head_end = max((m["step"] for m in metrics if m.get("phase") == "head"), default=None)
    for axes, (key, title, color) in zip(figure.subplots(1, 3, sharex=True), panels, strict=True):
        if head_end is not None:
            axes.axvspan(0, head_end, color="tab:purple", alpha=0.08, label="head warm-up")
        # The val-loss panel also shows the replay val loss (--replay-share): domain gain next to general loss.
        series = [(key, color, "domain val" if key == "val_mlm_loss" else None)]
        if key == "val_mlm_loss" and any("replay_val_mlm_loss" in m for m in metrics):
            series.append(("replay_val_mlm_loss", "tab:red", "replay val (forgetting)"))
        for series_key, series_color, label in series:
            points = [(m["step"], m[series_key]) for m in metrics
                      if series_key in m and m[series_key] is not None and not math.isnan(m[series_key])]
            if points:
                steps, values = zip(*points, strict=True)
                axes.plot(steps, values, color=series_color, marker="o" if key != "loss" else None, markersize=3,
                          label=label if len(series) > 1 else None)
                if key != "loss" and steps[0] == 0:
                    axes.annotate("base", (steps[0], values[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if best_step is not None:
            axes.axvline(best_step, color="grey", linestyle="--", linewidth=1, label=f"best (step {best_step})")
        if best_step is not None or head_end is not None or len(series) > 1:
            axes.legend(loc="best", fontsize=8)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())
    return path


def write_tensorboard(metrics: list[dict], directory: Path) -> Path | None:
    """The metrics as TensorBoard scalars in `directory` (replaced whole); None when tensorboard is absent."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    names = {"loss": "train/loss", "mlm_acc": "train/mlm_acc", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
             "val_mlm_loss": "val/mlm_loss", "val_mlm_acc": "val/mlm_acc",
             "replay_val_mlm_loss": "replay_val/mlm_loss", "replay_val_mlm_acc": "replay_val/mlm_acc"}
    with atomic_dir(directory, replace=True) as tmp:
        writer = SummaryWriter(log_dir=str(tmp))
        for entry in metrics:
            for key, tag in names.items():
                if isinstance(entry.get(key), int | float):
                    writer.add_scalar(tag, entry[key], global_step=entry["step"])
        writer.close()
    return Path(directory)


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.md and RUN_DIR/curves.png (and tensorboard/ when possible); returns report.md's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir}: no such run directory; pass the --output of a cpt run")
    metrics = read_metrics(run_dir)
    summary = summarize_run(run_dir, metrics)
    best_step = (summary["best"] or {}).get("step")
    plot_curves(metrics, best_step, run_dir / CURVES_NAME)
    write_tensorboard(metrics, run_dir / TENSORBOARD_DIR)
    path = run_dir / REPORT_NAME
    write_bytes_atomic(path, render_markdown(summary).encode("utf-8"))
    return path
