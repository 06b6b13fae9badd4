"""Stage 3, `cpt train --output RUN_DIR --base-model DIR`: continued MLM pretraining, one flat loop.

Reads RUN_DIR/shards/, writes RUN_DIR/checkpoints/step-N/, best.json and metrics.jsonl. Evaluates
the base model at step 0, then every --eval-interval steps and at every checkpoint; best.json
names the checkpoint with the best --best-metric. --resume auto continues exactly from the newest
valid checkpoint (same weights at the end as an uninterrupted run). SIGTERM/SIGINT finish the
step, write a checkpoint and exit 4. Under torchrun it trains with DDP, each rank taking a
contiguous share of every global batch.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from cpt import checkpoint as ckpt
from cpt.config import TrainConfig
from cpt.data import build_batch, masking_spec_for, micro_batches, next_global_batch, split_for_rank
from cpt.distributed import DistContext, all_reduce_sum, barrier, broadcast_flag, setup, teardown
from cpt.errors import BadInput, Interrupted
from cpt.evaluate import evaluate_mlm
from cpt.log import append_jsonl, info, warn
from cpt.manifest import read_json, require_manifest
from cpt.model import load_mlm_model, masked_lm_loss
from cpt.schedule import learning_rate_at
from cpt.shards import ShardSet
from cpt.tokenization import load_tokenizer, tokenizer_fingerprint

NO_DECAY_MARKERS = ("bias", "LayerNorm", "layer_norm", "layernorm")


class MaskedLMObjective(torch.nn.Module):
    """Wraps the model so DDP sees one forward: batch -> (loss_sum, correct, masked_count)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        return masked_lm_loss(self.model, input_ids, attention_mask, labels)


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


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if any(marker in name for marker in NO_DECAY_MARKERS) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast_for(device: torch.device, precision: str) -> tuple[contextlib.AbstractContextManager, str]:
    """(autocast context, resolved precision): bf16 on CUDA where supported, else fp16; fp32 on CPU."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext(), "fp32"
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype), precision


def run_record(config: TrainConfig, shards_manifest: dict) -> dict:
    """What a checkpoint must agree with to be resumed: data, tokenizer and the batch/optimizer shape."""
    return {
        "shards": {split: shards_manifest["splits"][split]["fingerprint"] for split in ("train", "val")},
        "tokenizer_sha256": shards_manifest["tokenizer_sha256"],
        "global_batch_size": config.global_batch_size,
        "masking": config.masking,
        "mask_prob": config.mask_prob,
        "seed": config.seed,
    }


def _check_compatible(checkpoint_path: Path, expected: dict) -> None:
    found = ckpt.read_checkpoint_record(checkpoint_path).get("run", {})
    changed = [key for key in expected if found.get(key) != expected[key]]
    if changed:
        raise BadInput(
            f"{checkpoint_path} was trained with other {', '.join(changed)}; resume with the same settings, "
            "or use a new --output (or --resume never in a new dir)"
        )


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines a killed run logged after the checkpoint we resume from."""
    if not path.exists():
        return
    import json

    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except ValueError:
            continue
    from cpt.manifest import write_bytes_atomic

    write_bytes_atomic(path, ("\n".join(kept) + "\n" if kept else "").encode())


def _is_better(metric: str, value: float, best: dict | None) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best["value"] if metric == "val_mlm_acc" else value < best["value"]


def train(config: TrainConfig) -> dict:
    """Train to --max-steps (or resume there); returns best.json's record."""
    context = setup(config.device)
    try:
        return _train(config, context)
    finally:
        teardown(context)


def _train(config: TrainConfig, context: DistContext) -> dict:
    run_dir = Path(config.output)
    shards_manifest = require_manifest(run_dir / "shards" / "manifest.json", "cpt tokenize")
    tokenizer = load_tokenizer(config.base_model)
    if tokenizer_fingerprint(tokenizer) != shards_manifest["tokenizer_sha256"]:
        raise BadInput(
            f"{run_dir}/shards were made with another tokenizer than --base-model {config.base_model}; "
            "rerun `cpt tokenize` (or `cpt run`) with this base model"
        )
    per_rank = config.global_batch_size // context.world_size
    if config.global_batch_size % context.world_size or per_rank % config.micro_batch_size:
        raise BadInput(
            f"--global-batch-size {config.global_batch_size} must split evenly into {context.world_size} "
            f"process(es) x --micro-batch-size {config.micro_batch_size}; pick a multiple of "
            f"{context.world_size * config.micro_batch_size}"
        )
    train_set, val_set = ShardSet(run_dir / "shards", "train"), ShardSet(run_dir / "shards", "val")
    if len(train_set) == 0:
        raise BadInput(f"{run_dir}/shards/train holds no sequence; pass a larger corpus")
    max_positions = (read_json(Path(config.base_model) / "config.json") or {}).get("max_position_embeddings", 512)
    seq_length = shards_manifest["settings"]["max_seq_length"]
    if seq_length > max_positions:
        raise BadInput(f"shards use --max-seq-length {seq_length} > the model's {max_positions} positions; "
                       f"retokenize with --max-seq-length {max_positions}")
    spec = masking_spec_for(tokenizer, config.masking, config.mask_prob, config.span_p, config.span_max)
    record = run_record(config, shards_manifest)

    model = load_mlm_model(config.base_model, context.device)
    if config.init_from_uer is not None:
        from cpt.convert import load_uer_into

        load_uer_into(model, config.init_from_uer, config.base_model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    use_fused = context.device.type == "cuda"
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.999), eps=1e-6, fused=use_fused)
    state = ckpt.TrainState()
    checkpoints_root = ckpt.checkpoints_dir(run_dir)
    resume_from = _resume_path(config, run_dir)
    if resume_from is not None:
        _check_compatible(resume_from, record)
        state = ckpt.load_checkpoint(resume_from, model, optimizer)
        info(f"train: resumed from {resume_from} (step {state.step})")
    metrics_path = run_dir / "metrics.jsonl"
    if context.is_main_process:
        checkpoints_root.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, state.step if resume_from else -1)
    if config.compile:
        model.base_model.compile()
    objective = MaskedLMObjective(model)
    if context.is_distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=device_ids)
    autocast, precision = autocast_for(context.device, config.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    accum_steps = per_rank // config.micro_batch_size
    info(
        f"train: {len(train_set)} train / {len(val_set)} val sequences, {type(model).__name__} "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {context.device} ({precision}), "
        f"global batch {config.global_batch_size} = {context.world_size} x {accum_steps} x {config.micro_batch_size}"
    )

    def evaluate_now() -> dict:
        return evaluate_mlm(objective, val_set, spec, seed=config.seed, max_sequences=config.eval_max_sequences,
                            micro_batch_size=config.micro_batch_size, context=context, autocast=autocast)

    def log(entry: dict) -> None:
        if context.is_main_process:
            append_jsonl(metrics_path, entry)

    if state.step == 0 and resume_from is None:
        metrics = evaluate_now()
        log({"step": 0, "tokens_seen": 0, **metrics})
        info(f"step 0 (base model): val_mlm_loss {metrics['val_mlm_loss']:.4f}, "
             f"val_mlm_acc {metrics['val_mlm_acc']:.4f}")

    objective.train()
    window = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "tokens": 0, "started": time.perf_counter()}
    run_started = time.perf_counter() - state.elapsed_s
    log_interval = max(1, min(config.eval_interval, 50))
    with StopSignal() as stop:
        while state.step < config.max_steps:
            lr = learning_rate_at(state.step, peak_lr=config.lr, warmup_steps=config.resolved_warmup_steps,
                                  max_steps=config.max_steps, min_lr_ratio=config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Dropout draws depend only on (seed, step, rank): a resumed run repeats them exactly.
            torch.manual_seed(config.seed * 1_000_003 + state.step * 7919 + context.rank)
            picks, next_sampler = next_global_batch(state.sampler, num_sequences=len(train_set),
                                                    count=config.global_batch_size, seed=config.seed)
            batches = [build_batch(train_set, chunk, spec, config.seed)
                       for chunk in micro_batches(split_for_rank(picks, context.rank, context.world_size),
                                                  config.micro_batch_size)]
            # Normalise by the masked tokens of the whole global batch so the update does not
            # depend on how the batch is split into micro-batches and processes.
            local_masked = sum(int((batch["labels"] != -100).sum()) for batch in batches)
            global_masked = all_reduce_sum(torch.tensor([float(local_masked)], device=context.device), context)
            denominator = max(global_masked.item(), 1.0) / context.world_size
            step_tokens = torch.zeros(4, dtype=torch.float64, device=context.device)
            for index, batch in enumerate(batches):
                batch = {key: value.to(context.device, non_blocking=True) for key, value in batch.items()}
                sync = index == len(batches) - 1 or not context.is_distributed
                with (contextlib.nullcontext() if sync else objective.no_sync()), autocast:
                    loss_sum, correct, count = objective(**batch)
                scaler.scale(loss_sum / denominator).backward()
                step_tokens += torch.stack([loss_sum.detach().double(), correct.double(), count.double(),
                                            batch["attention_mask"].sum().double()])
            scaler.unscale_(optimizer)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(objective.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            all_reduce_sum(step_tokens, context)
            loss_sum_value, correct_value, count_value, real_tokens = step_tokens.tolist()
            state.step += 1
            state.tokens_seen += int(real_tokens)
            state.sampler = next_sampler
            state.elapsed_s = time.perf_counter() - run_started
            window["loss_sum"] += loss_sum_value
            window["correct"] += correct_value
            window["count"] += count_value
            window["tokens"] += int(real_tokens)
            if not math.isfinite(loss_sum_value):
                raise BadInput(f"training diverged at step {state.step} (loss {loss_sum_value}); lower --lr "
                               "or resume from an earlier checkpoint")

            last_step = state.step == config.max_steps
            is_save = state.step % config.save_interval == 0 or last_step
            is_eval = state.step % config.eval_interval == 0 or is_save
            if state.step % log_interval == 0 or is_eval or last_step:
                seconds = time.perf_counter() - window["started"]
                entry = {
                    "step": state.step, "tokens_seen": state.tokens_seen, "lr": lr,
                    "loss": window["loss_sum"] / max(window["count"], 1),
                    "mlm_acc": window["correct"] / max(window["count"], 1),
                    "tokens_per_s": window["tokens"] / max(seconds, 1e-9),
                    "elapsed_s": round(state.elapsed_s, 3),
                }
                if is_eval:
                    entry.update(evaluate_now())
                log(entry)
                _print_progress(entry, config.max_steps, state.elapsed_s)
                window = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "tokens": 0,
                          "started": time.perf_counter()}
                if is_save:
                    _save(run_dir, model, optimizer, state, record, config, entry, context)
            stopping = broadcast_flag(stop.requested, context)
            if stopping and not last_step:
                if not is_save:
                    entry = {"step": state.step, "tokens_seen": state.tokens_seen, **evaluate_now()}
                    log(entry)
                    _save(run_dir, model, optimizer, state, record, config, entry, context)
                raise Interrupted(f"interrupted at step {state.step}; checkpoint saved, rerun the same command "
                                  "to resume")
    best = ckpt.best_pointer(run_dir) or {}
    info(f"train: done at step {state.step}; best {best.get('metric')} {best.get('value', float('nan')):.4f} "
         f"at step {best.get('step')}")
    return best


def _resume_path(config: TrainConfig, run_dir: Path) -> Path | None:
    if config.resume == "auto":
        return ckpt.latest_valid_checkpoint(run_dir) if ckpt.step_dirs(run_dir) else None
    if config.resume == "never":
        if ckpt.step_dirs(run_dir):
            raise BadInput(f"--resume never, but {ckpt.checkpoints_dir(run_dir)} holds checkpoints; "
                           "use a new --output or --resume auto")
        return None
    path = Path(config.resume)
    if not path.is_absolute() and not path.exists():
        path = ckpt.checkpoints_dir(run_dir) / config.resume
    if not ckpt.is_valid_checkpoint(path):
        raise BadInput(f"--resume {config.resume}: not a valid checkpoint dir; use auto, never or a step-N dir")
    return path


def _save(run_dir: Path, model, optimizer, state, record: dict, config: TrainConfig, metrics: dict,
          context: DistContext) -> None:
    if context.is_main_process:
        path = ckpt.save_checkpoint(run_dir, model, optimizer, state, {**record, "metrics": metrics})
        value = metrics.get(config.best_metric, math.nan)
        if _is_better(config.best_metric, value, ckpt.best_pointer(run_dir)):
            ckpt.write_best_pointer(run_dir, state.step, config.best_metric, value)
        ckpt.prune_checkpoints(run_dir, config.keep_checkpoints)
        info(f"checkpoint: {path}")
    barrier(context)


def _print_progress(entry: dict, max_steps: int, elapsed_s: float) -> None:
    step = entry["step"]
    eta_s = elapsed_s / max(step, 1) * (max_steps - step)
    text = (f"step {step}/{max_steps}  loss {entry['loss']:.4f}  acc {entry['mlm_acc']:.4f}  lr {entry['lr']:.2e}  "
            f"{entry['tokens_per_s']:.0f} tok/s  eta {eta_s / 60:.1f} min")
    if "val_mlm_acc" in entry:
        text += f"  val_loss {entry['val_mlm_loss']:.4f}  val_acc {entry['val_mlm_acc']:.4f}"
    info(text)
