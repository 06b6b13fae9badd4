"""`cpt run`: prepare -> tokenize -> train -> export, idempotent, and `cpt demo`.

Each stage checks its own manifest and skips what is current; training resumes from the newest
valid checkpoint; export reruns only when the chosen checkpoint changed. Under torchrun only
rank 0 runs the data stages, the others wait for them.

    run_pipeline({"corpus": ("data/",), "base_model": Path("base"), "output": Path("run"), ...})
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cpt import config as cfg
from cpt.common.runtime import info
from cpt.errors import BadInput


def run_pipeline(values: dict[str, Any]) -> Path | None:
    prepare_config = cfg.check(cfg.stage_config(cfg.PrepareConfig, values))
    tokenize_config = cfg.check(cfg.stage_config(cfg.TokenizeConfig, values))
    train_config = cfg.check(cfg.stage_config(cfg.TrainConfig, values))
    export_config = cfg.check(cfg.stage_config(cfg.ExportConfig, values))
    if found := cfg.replay_problems(prepare_config, train_config):
        raise BadInput("; ".join(found))
    from cpt.data.prepare import prepare_corpus
    from cpt.data.replay import check_replay_corpus, prepare_replay, tokenize_replay
    from cpt.data.tokenization import tokenize_corpus
    from cpt.export.export import export_model
    from cpt.training.loop import train
    from cpt.training.model import check_base_model

    started = time.perf_counter()
    check_base_model(train_config.base_model)
    rank = _rank()
    if rank == 0:
        if prepare_config.replay_corpus:
            check_replay_corpus(prepare_config)  # a wrong replay path fails now, not after the main stages
        prepare_corpus(prepare_config)
        tokenize_corpus(tokenize_config)
        if prepare_config.replay_corpus:  # general text replayed against forgetting, into RUN_DIR/replay/
            prepare_replay(prepare_config)
            tokenize_replay(tokenize_config)
    _wait_for_rank_zero()
    train(train_config)
    if rank != 0:
        return None
    model_dir = export_model(export_config)
    from cpt.common.runtime import warn
    from cpt.tools.report import write_report

    try:
        info(f"run: report {write_report(Path(train_config.output))}")
    except Exception as error:  # the model is exported: a plotting problem must not fail the job
        warn(f"the run report could not be written ({type(error).__name__}: {error}); `cpt report RUN_DIR` retries")
    summary = _summary(Path(train_config.output))
    info(f"run: done in {time.perf_counter() - started:.0f} s. Model: {model_dir}")
    if summary:
        info(summary)
    return model_dir


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _wait_for_rank_zero() -> None:
    """Other ranks block until rank 0 has prepared and tokenized (a gloo group just for this)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        import torch

        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    dist.barrier()


def _summary(run_dir: Path) -> str:
    import json

    from cpt.training.checkpoint import best_pointer

    best = best_pointer(run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    base = next((m for m in metrics if m.get("step") == 0 and "val_mlm_acc" in m), None)
    if not best or not base:
        return ""
    return (f"val_mlm_acc: {base['val_mlm_acc']:.4f} at step 0 (base) -> {best['value']:.4f} at step "
            f"{best['step']} (best {best['metric']})" if best["metric"] == "val_mlm_acc" else
            f"val_mlm_loss: {base['val_mlm_loss']:.4f} at step 0 (base) -> {best['value']:.4f} at step {best['step']}")


def run_demo(output: Path, *, max_steps: int) -> Path | None:
    """The whole job on the embedded sample corpus and a tiny random base model."""
    from cpt.training.model import asset_path, init_base

    output = Path(output)
    base = output / "base-model"
    if not (base / "config.json").exists():
        output.mkdir(parents=True, exist_ok=True)
        init_base(base, preset="tiny", seed=0)
    values = {
        "corpus": (str(asset_path("sample_corpus.txt")),), "base_model": base, "output": output / "run",
        "max_seq_length": 128, "micro_batch_size": 16, "global_batch_size": 32, "max_steps": max_steps,
        "lr": 3e-3, "warmup_steps": max_steps // 10, "eval_interval": max(1, max_steps // 6),
        "save_interval": max(1, max_steps // 3), "val_fraction": 0.05,
    }
    return run_pipeline(values)
