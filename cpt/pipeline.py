"""What each `cpt` command runs: the stage functions of cli.py's table, each taking its checked config.

`cpt run` is prepare -> tokenize -> train -> export, idempotent: each stage checks its own manifest
and skips what is current; training resumes from the newest valid checkpoint; export reruns only
when the chosen checkpoint changed. Under torchrun only rank 0 runs the data stages (and the
--init-from-uer conversion), the others wait for them.

    run_pipeline({"corpus": ("data/",), "base_model": Path("base"), "output": Path("run"), ...})
    train_stage(TrainConfig(output=Path("run"), base_model=Path("base"), init_from_uer=Path("model.bin-5000")))
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cpt import config as cfg
from cpt.common.runtime import info, is_main_process, world_size

UER_INIT_RECORD = "converted-from.json"  # in RUN_DIR/uer-init/: which UER file (size, mtime) it was made from


def prepare_stage(config: cfg.PrepareConfig) -> None:
    from cpt.data.prepare import prepare_corpus
    from cpt.data.replay import check_replay_corpus, prepare_replay

    if config.replay_corpus:
        check_replay_corpus(config)  # a wrong replay path fails now, not after the main corpus
    prepare_corpus(config)
    if config.replay_corpus:  # general text replayed against forgetting, into RUN_DIR/replay/
        prepare_replay(config)


def tokenize_stage(config: cfg.TokenizeConfig) -> None:
    from cpt.data.replay import is_prepared, tokenize_replay
    from cpt.data.tokenization import tokenize_corpus

    tokenize_corpus(config)
    if is_prepared(config.output):
        tokenize_replay(config)


def train_stage(config: cfg.TrainConfig) -> dict:
    """Train; with --init-from-uer first convert the UER-py file into RUN_DIR/uer-init/ (rank 0, once per file)."""
    from cpt.training.loop import train

    if config.init_from_uer is not None:
        if is_main_process():
            convert_init_from_uer(config)
        _wait_for_rank_zero()
    return train(config)


def convert_init_from_uer(config: cfg.TrainConfig) -> Path:
    """RUN_DIR/uer-init/: the --init-from-uer file as a HF model dir that training starts from. Skipped when
    its record names the same file, size and mtime (and base model); replaces only a uer-init cpt wrote."""
    from cpt.common.files import atomic_dir, claim_run_dir, read_json, write_json_atomic
    from cpt.common.weights import find_weights_file
    from cpt.errors import BadInput
    from cpt.export.convert import uer_to_hf
    from cpt.training.model import UER_INIT_DIR

    uer_file, base_model = Path(config.init_from_uer).resolve(), Path(config.base_model).resolve()
    target = Path(config.output) / UER_INIT_DIR
    source = {"uer_file": str(uer_file), "base_model": str(base_model)}
    for name, path in (("uer", uer_file), ("base_config", base_model / "config.json"),
                       ("base_weights", find_weights_file(base_model))):
        stat = path.stat()
        source.update({f"{name}_bytes": stat.st_size, f"{name}_mtime_ns": stat.st_mtime_ns})
    record = read_json(target / UER_INIT_RECORD)
    if record == source:
        info(f"train: {target} is up to date with --init-from-uer {uer_file}")
        return target
    if record is None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BadInput(f"{target} exists but cpt did not write it; move it away (RUN_DIR/{UER_INIT_DIR}/ holds "
                       "the --init-from-uer conversion)")
    claim_run_dir(Path(config.output), overwrite=False)  # never write into a folder of the user's files
    with atomic_dir(target, replace=True) as scratch:  # a converted dir only ever appears whole, with its record
        report = uer_to_hf(uer_file, base_model, scratch)  # takes over the empty scratch dir
        write_json_atomic(scratch / UER_INIT_RECORD, source)
    info(f"train: --init-from-uer {uer_file}: {report.layers} layers -> {target}")
    return target


def run_stage(config: cfg.RunConfig) -> Path | None:
    """`cpt run`: the four stages (or, with --dry-run, `cpt plan`). The exported model dir on rank 0."""
    if config.dry_run:
        plan_stage(config)
        return None
    from cpt.export.export import export_model
    from cpt.training.model import check_base_model

    started = time.perf_counter()
    check_base_model(config.train.base_model)
    if is_main_process():
        prepare_stage(config.prepare)
        tokenize_stage(config.tokenize)
    _wait_for_rank_zero()
    train_stage(config.train)
    if not is_main_process():
        return None
    model_dir = export_model(config.export)
    _write_report(Path(config.train.output))
    info(f"run: done in {time.perf_counter() - started:.0f} s. Model: {model_dir}")
    if summary := _summary(Path(config.train.output)):
        info(summary)
    return model_dir


def run_pipeline(values: dict[str, Any]) -> Path | None:
    """`cpt run` from option values by name (as the CLI gives them)."""
    return run_stage(cfg.check(cfg.stage_config(cfg.RunConfig, values)))


def plan_stage(config: cfg.PlanConfig) -> dict:
    from cpt.tools.plan import plan_run

    return plan_run(config.values(), as_json=config.as_json)


def _wait_for_rank_zero() -> None:
    """Other ranks block until rank 0 has prepared and tokenized (a gloo group just for this)."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        import torch

        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    dist.barrier()


def _write_report(run_dir: Path) -> None:
    from cpt.common.runtime import warn
    from cpt.tools.report import write_report

    try:
        info(f"run: report {write_report(run_dir)}")
    except Exception as error:  # the model is exported: a plotting problem must not fail the job
        warn(f"the run report could not be written ({type(error).__name__}: {error}); `cpt report RUN_DIR` retries")


def _summary(run_dir: Path) -> str:
    from cpt.common.metrics import evaluated, read_metrics
    from cpt.training.checkpoint import best_pointer

    best = best_pointer(run_dir)
    base = next((entry for entry in evaluated(read_metrics(run_dir)) if entry["step"] == 0), None)
    if not best or not base:
        return ""
    if best["metric"] == "val_mlm_acc":
        return (f"val_mlm_acc: {base['val_mlm_acc']:.4f} at step 0 (base) -> {best['value']:.4f} at step "
                f"{best['step']} (best {best['metric']})")
    return f"val_mlm_loss: {base['val_mlm_loss']:.4f} at step 0 (base) -> {best['value']:.4f} at step {best['step']}"


def report_stage(config: cfg.ReportConfig) -> Path:
    from cpt.tools.report import CURVES_NAME, write_report

    path = write_report(config.run_dir)
    info(f"report: {path} and {path.with_name(CURVES_NAME)}")
    return path


def init_base_stage(config: cfg.InitBaseConfig) -> Path:
    from cpt.training.model import init_base

    return init_base(config.output_dir, preset=config.preset, seed=config.seed)


def run_demo(config: cfg.DemoConfig) -> Path | None:
    """The whole job on the embedded sample corpus and a tiny random base model."""
    from cpt.training.model import asset_path, init_base

    output = Path(config.output)
    base = output / "base-model"
    if not (base / "config.json").exists():
        output.mkdir(parents=True, exist_ok=True)
        init_base(base, preset="tiny", seed=0)
    max_steps = config.max_steps
    values = {
        "corpus": (str(asset_path("sample_corpus.txt")),), "base_model": base, "output": output / "run",
        "max_seq_length": 128, "micro_batch_size": 16, "global_batch_size": 32, "max_steps": max_steps,
        "lr": 3e-3, "warmup_steps": max_steps // 10, "eval_interval": max(1, max_steps // 6),
        "save_interval": max(1, max_steps // 3), "val_fraction": 0.05,
    }
    return run_pipeline(values)


def convert_stage(config: cfg.ConvertConfig):
    """`cpt convert`: UER-py -> HF dir (keys UER lacks from --base-model) or HF dir -> UER-py file."""
    from cpt.export.convert import hf_to_uer, uer_to_hf

    if config.from_format == "uer":
        report = uer_to_hf(config.source, config.base_model, config.destination, target=config.target)
    else:
        report = hf_to_uer(config.source, config.destination, target="mlm" if config.target == "auto" else config.target)
    info(f"convert: {report.layers} layers -> {report.written}")
    if report.keys_from_base:
        info(f"  {len(report.keys_from_base)} keys from the base model: {', '.join(report.keys_from_base[:4])}")
    if report.keys_left_out:
        info(f"  {len(report.keys_left_out)} keys left out: {', '.join(report.keys_left_out[:4])}")
    return report
