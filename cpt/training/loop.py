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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from cpt.common.base_model import tokenizer_fingerprint
from cpt.common.files import read_json, require_manifest, write_json_atomic
from cpt.common.metrics import append_metrics
from cpt.common.runtime import StepProgress, info, print_table, warn
from cpt.config import TrainConfig
from cpt.data.replay import replay_shards_dir
from cpt.data.shards import ShardSet, require_current_format
from cpt.data.vocab import resize_for_extension, training_tokenizer
from cpt.errors import BadInput, Interrupted
from cpt.training import checkpoint as ckpt
from cpt.training.batches import BatchFeed, MaskingSpec, SamplerState, StepBatching, masking_spec_for
from cpt.training.cpu import tune_cpu_training
from cpt.training.distributed import DistContext, all_reduce_sum, barrier, broadcast_flag, setup, teardown
from cpt.training.evaluate import evaluate_mlm
from cpt.training.head_warmup import (
    CHECK_FILE,
    HeadCheck,
    after_head_eval,
    check_head,
    check_line,
    freeze_all_but_head,
    head_eval_interval,
    head_parameters,
    off_warning,
    planned_head_steps,
    reinit_head,
    unigram_loss,
)
from cpt.training.model import IGNORE_INDEX, NO_DECAY_MARKERS, MaskedLMObjective, load_mlm_model, parameter_groups
from cpt.training.schedule import learning_rate_at


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


def autocast_for(device: torch.device, precision: str) -> tuple[contextlib.AbstractContextManager, str]:
    """(autocast context, resolved precision). auto = bf16 where the hardware multiplies bf16 natively
    (CUDA with bf16 support, CPUs with AMX or AVX512-BF16: 1.4x faster per step on an AMX CPU), else
    fp16 on CUDA and fp32 on other CPUs. fp16 is CUDA only; an explicit bf16 is honoured everywhere."""
    if device.type != "cuda":
        wanted = "bf16" if precision == "bf16" or (precision == "auto" and cpu_has_native_bf16()) else "fp32"
        return (torch.autocast("cpu", dtype=torch.bfloat16) if wanted == "bf16" else contextlib.nullcontext()), wanted
    if precision == "fp32":
        return contextlib.nullcontext(), "fp32"
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype), precision


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16: bf16 matmuls run in hardware (elsewhere oneDNN emulates them, slower than fp32)."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and probe() for probe in probes) and torch.backends.mkldnn.is_available()


def run_record(config: TrainConfig, shards_manifest: dict, replay_manifest: dict | None = None) -> dict:
    """What a checkpoint must agree with to be resumed: data, tokenizer and the batch/optimizer shape (and with
    --replay-share, the share and the replay shards; absent without, so runs from before replay still resume)."""
    replay = {}
    if config.replay_share:
        replay = {"replay_share": config.replay_share,
                  "replay_shards": {split: replay_manifest["splits"][split]["fingerprint"] for split in ("train", "val")}}
    return {
        **replay,
        "shards": {split: shards_manifest["splits"][split]["fingerprint"] for split in ("train", "val")},
        "tokenizer_sha256": shards_manifest["tokenizer_sha256"],
        "global_batch_size": config.global_batch_size,
        "masking": config.masking,
        "mask_prob": config.mask_prob,
        "seed": config.seed,
        # only when not the defaults: checkpoints written before the head phase existed still resume
        **{name: getattr(config, name) for name in ("head_warmup", "head_warmup_lr")
           if getattr(config, name) != TrainConfig.__dataclass_fields__[name].default},
    }


def _check_compatible(checkpoint_path: Path, expected: dict) -> None:
    found = ckpt.read_checkpoint_record(checkpoint_path).get("run", {})
    changed = [key for key in expected if found.get(key) != expected[key]]
    if "replay_share" in found and "replay_share" not in expected:  # trained with replay, resumed without
        changed.append("replay_share")
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
    from cpt.common.files import write_bytes_atomic

    write_bytes_atomic(path, ("\n".join(kept) + "\n" if kept else "").encode())


def is_better(metric: str, metrics: dict, best: dict | None) -> bool:
    """Is this evaluation better than the best so far? Ties in accuracy go to the lower loss."""
    value = metrics.get(metric, math.nan)
    if math.isnan(value):
        return False
    if best is None:
        return True
    if metric == "val_mlm_loss":
        return value < best["value"]
    return (value, -metrics.get("val_mlm_loss", math.inf)) > (best["value"], -best.get("val_mlm_loss", math.inf))


def train(config: TrainConfig) -> dict:
    """Train to --max-steps (or resume there); returns best.json's record."""
    context = setup(config.device)
    try:
        return _train(config, context)
    finally:
        teardown(context)


@dataclass
class Session:
    """Everything a training step needs, built once by `start_session`."""

    config: TrainConfig
    context: DistContext
    model: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager
    precision: str
    train_set: ShardSet
    val_set: ShardSet
    spec: MaskingSpec
    record: dict
    micro_batch_size: int
    seq_length: int
    head_optimizer: torch.optim.Optimizer | None = None  # built when the head phase first runs
    replay_train_set: ShardSet | None = None  # --replay-share: RUN_DIR/replay/shards
    replay_val_set: ShardSet | None = None

    @property
    def accum_steps(self) -> int:
        return self.config.global_batch_size // self.context.world_size // self.micro_batch_size

    @property
    def batching(self) -> StepBatching:
        return StepBatching(shards_dir=Path(self.config.output) / "shards", spec=self.spec, seed=self.config.seed,
                            global_batch_size=self.config.global_batch_size, micro_batch_size=self.micro_batch_size,
                            seq_length=self.seq_length, rank=self.context.rank, world_size=self.context.world_size,
                            opened_shards=self.train_set, replay_shards_dir=replay_shards_dir(self.config.output),
                            replay_share=self.config.replay_share, opened_replay=self.replay_train_set)


def start_session(config: TrainConfig, context: DistContext) -> Session:
    """Check the inputs and build model, optimizer and data for training (or for a timing probe)."""
    run_dir = Path(config.output)
    shards_manifest = require_manifest(run_dir / "shards" / "manifest.json", "cpt tokenize")
    require_current_format(run_dir / "shards", shards_manifest)
    tokenizer = training_tokenizer(run_dir, config.base_model, shards_manifest)  # RUN_DIR/tokenizer/ if extended
    if tokenizer_fingerprint(tokenizer) != shards_manifest["tokenizer_sha256"]:
        raise BadInput(
            f"{run_dir}/shards were made with another tokenizer than --base-model {config.base_model}; "
            "rerun `cpt tokenize` (or `cpt run`) with this base model"
        )
    if config.global_batch_size % context.world_size:
        raise BadInput(f"--global-batch-size {config.global_batch_size} must be a multiple of the "
                       f"{context.world_size} processes")
    train_set, val_set = ShardSet(run_dir / "shards", "train"), ShardSet(run_dir / "shards", "val")
    if len(train_set) == 0:
        raise BadInput(f"{run_dir}/shards/train holds no sequence; pass a larger corpus")
    replay_manifest, replay_train_set, replay_val_set = open_replay(config, shards_manifest)
    max_positions = (read_json(Path(config.base_model) / "config.json") or {}).get("max_position_embeddings", 512)
    seq_length = shards_manifest["settings"]["max_seq_length"]
    if seq_length > max_positions:
        raise BadInput(f"shards use --max-seq-length {seq_length} > the model's {max_positions} positions; "
                       f"retokenize with --max-seq-length {max_positions}")
    spec = masking_spec_for(tokenizer, config.masking, config.mask_prob, config.span_p, config.span_max)
    model = load_mlm_model(config.base_model, context.device)
    if config.init_from_uer is not None:
        from cpt.export.convert import load_uer_into

        load_uer_into(model, config.init_from_uer, config.base_model)
    resize_for_extension(model, shards_manifest)  # --extend-vocab: new embedding/decoder/bias rows
    if config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if context.device.type == "cpu":
        tune_cpu_training(model, compiled=config.compile)  # each measured in docs/benchmarks.md
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.999), eps=1e-6, fused=True)  # fused kernels: CUDA and CPU
    # The precision first: whether the unpadded path's flash kernel can run depends on it.
    autocast, precision = autocast_for(context.device, config.precision)
    objective = MaskedLMObjective(model, unpad=resolve_unpad(config.unpad, model, context.device, precision))
    session = Session(config=config, context=context, model=model, objective=objective, optimizer=optimizer,
                      scaler=torch.amp.GradScaler("cuda", enabled=precision == "fp16"), autocast=autocast,
                      precision=precision, train_set=train_set, val_set=val_set, spec=spec,
                      record=run_record(config, shards_manifest, replay_manifest), micro_batch_size=1,
                      seq_length=seq_length, replay_train_set=replay_train_set, replay_val_set=replay_val_set)
    if objective.unpad:
        from cpt.training.fastpath_check import guard_unpadded_path

        guard_unpadded_path(session)  # on CUDA: the fast path against the padded one on real data, or fall back
    if config.compile:
        compile_model(model, objective.unpad)
    # The micro-batch search runs before DDP wraps the model (an OOM in DDP's backward leaves its reducer
    # mid-reduction), on the path that will train; the ranks then agree on the smallest size.
    session.micro_batch_size = resolve_micro_batch_size(session, run_dir)
    if context.is_distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        session.objective = DistributedDataParallel(objective, device_ids=device_ids)
    return session


def open_replay(config: TrainConfig, shards_manifest: dict) -> tuple[dict | None, ShardSet | None, ShardSet | None]:
    """--replay-share: the replay shards' manifest and train/val sets, checked to share the main shards' tokenizer."""
    if not config.replay_share:
        return None, None, None
    shards_dir = replay_shards_dir(config.output)
    manifest = require_manifest(shards_dir / "manifest.json", "cpt prepare --replay-corpus PATH && cpt tokenize")
    require_current_format(shards_dir, manifest)
    if manifest["tokenizer_sha256"] != shards_manifest["tokenizer_sha256"]:
        raise BadInput(f"{shards_dir} was made with another tokenizer than {config.output}/shards; rerun "
                       "`cpt tokenize` (or `cpt run`) to tokenize both again")
    replay_train_set, replay_val_set = ShardSet(shards_dir, "train"), ShardSet(shards_dir, "val")
    if len(replay_train_set) == 0:
        raise BadInput(f"{shards_dir}/train holds no sequence; pass a larger --replay-corpus")
    return manifest, replay_train_set, replay_val_set


def loader_workers(config: TrainConfig, device: torch.device) -> int:
    """--loader-workers, where -1 (auto) means 2 loader processes on CUDA and none on CPU (where they
    would only take cores from the model's math)."""
    return config.loader_workers if config.loader_workers >= 0 else 2 * (device.type == "cuda")


def batch_feed(session: Session, sampler: SamplerState, steps: int) -> BatchFeed:
    """The batches of the next `steps` steps from `sampler` on, built as --loader-workers says."""
    return BatchFeed(session.batching, sampler, workers=loader_workers(session.config, session.context.device),
                     steps=steps, pin_memory=session.context.device.type == "cuda")


def resolve_unpad(setting: str, model: torch.nn.Module, device: torch.device, precision: str) -> bool:
    """Whether to train on the unpadded path; logs the choice and why.

    auto: only where its flash varlen kernel runs (CUDA, sm80+, bf16/fp16) and the model has no attention
    dropout (the kernel has none, cpt/training/unpadded.py), else the padded SDPA path. on: unpad anyway, without
    attention dropout (on CPU through the reference kernel); an error on CUDA where flash cannot run."""
    from cpt.training.unpadded import attention_dropout_p, flash_varlen_unusable, supports_unpadding

    if setting == "off":
        return False
    if not supports_unpadding(model):
        if setting == "on":
            raise BadInput(f"--unpad on: {model.config.model_type} models are not supported; use --unpad off")
        info(f"train: --unpad auto -> padded SDPA path ({model.config.model_type} models are not unpadded)")
        return False
    unusable, dropout_p = flash_varlen_unusable(device, precision), attention_dropout_p(model)
    if setting == "on":
        if device.type == "cuda" and unusable:
            raise BadInput(f"--unpad on: {unusable}; use --precision bf16 (or fp16) or --unpad off")
        if dropout_p > 0:
            warn(f"--unpad on: no attention-probability dropout on the unpadded path (the model's is {dropout_p:g}; "
                 "flash varlen attention has none); hidden-state dropout stays. --unpad off keeps it")
        info(f"train: --unpad on -> unpadded path ({'reference kernel' if unusable else 'flash varlen attention'})")
        return True
    if unusable is None and dropout_p > 0:
        unusable = (f"the model's attention dropout {dropout_p:g} has no flash varlen kernel; "
                    "--unpad on trades it for speed")
    info("train: --unpad auto -> " + (f"padded SDPA path ({unusable})" if unusable
                                      else f"unpadded path (flash varlen attention, {precision})"))
    return unusable is None


def compile_model(model: torch.nn.Module, unpad: bool) -> None:
    """torch.compile the encoder's parts that run on each path (shapes vary: dynamic on the unpadded one)."""
    if not unpad:
        model.base_model.compile()
        return
    for layer in model.base_model.encoder.layer:
        for part in (layer.attention.output, layer.intermediate, layer.output):
            part.compile(dynamic=True)


def masked_denominator(local_masked: int, context: DistContext) -> float | torch.Tensor:
    """What each rank divides its loss sum by: the global batch's masked tokens / ranks (DDP averages the
    gradients over ranks). Across ranks it stays a device scalar: reading it back would make the host wait
    for the device at the start of every step."""
    if not context.is_distributed:
        return float(max(local_masked, 1))
    # torch.full fills on the device; torch.tensor(x, device=...) would copy from pageable memory and wait for it.
    global_masked = all_reduce_sum(torch.full((), float(local_masked), device=context.device), context)
    return global_masked.clamp(min=1.0) / context.world_size


@dataclass
class Phase:
    """What a step trains: the whole model (full) or, during the head warm-up, the MLM head alone."""

    name: str  # "head" or "full"
    objective: torch.nn.Module  # the head phase bypasses DDP: its few gradients are all-reduced by hand
    optimizer: torch.optim.Optimizer
    parameters: list[torch.nn.Parameter]

    @property
    def uses_ddp(self) -> bool:
        return isinstance(self.objective, DistributedDataParallel)


def enter_phase(session: Session, state: ckpt.TrainState) -> Phase:
    """The phase of the step at `state`, with the model's trainable parameters set for it."""
    head_only = state.phase == "head"
    freeze_all_but_head(session.model, head_only)
    if not head_only:
        return Phase("full", session.objective, session.optimizer, list(session.model.parameters()))
    if session.head_optimizer is None:
        own = head_parameters(session.model)
        no_decay = {n for n in own if any(marker in n for marker in NO_DECAY_MARKERS)}
        groups = [{"params": [p for n, p in own.items() if n not in no_decay], "weight_decay": session.config.weight_decay},
                  {"params": [p for n, p in own.items() if n in no_decay], "weight_decay": 0.0}]
        session.head_optimizer = torch.optim.AdamW(groups, lr=session.config.head_warmup_lr, betas=(0.9, 0.999),
                                                   eps=1e-6, fused=True)
    objective = MaskedLMObjective(session.model, unpad=_unwrap(session.objective).unpad)
    return Phase("head", objective, session.head_optimizer, list(head_parameters(session.model).values()))


def _unwrap(objective: torch.nn.Module) -> torch.nn.Module:
    return objective.module if isinstance(objective, DistributedDataParallel) else objective


def step_learning_rate(config: TrainConfig, state: ckpt.TrainState) -> float:
    """Constant --head-warmup-lr in the head phase; then warmup + decay over the steps left after it."""
    if state.phase == "head":
        return config.head_warmup_lr
    start = state.head.full_phase_start
    return learning_rate_at(state.step - start, peak_lr=config.lr, warmup_steps=config.resolved_warmup_steps,
                            max_steps=config.max_steps - start, min_lr_ratio=config.min_lr_ratio)


def train_step(session: Session, state: ckpt.TrainState, prepared: tuple[list[dict], SamplerState],
               phase: Phase | None = None) -> tuple[StepSums, SamplerState]:
    """One optimizer step on `prepared` (the global batch at `state`, from `batch_feed`), queued on the
    device; returns its sums (read them with `.values()`) and the next sampler state."""
    config, context = session.config, session.context
    phase = phase or enter_phase(session, state)
    lr = step_learning_rate(config, state)
    for group in phase.optimizer.param_groups:
        group["lr"] = lr
    # Dropout draws depend only on (seed, step, rank): a resumed run repeats them exactly.
    torch.manual_seed(config.seed * 1_000_003 + state.step * 7919 + context.rank)
    batches, next_sampler = prepared
    # Normalise by the masked tokens of the whole global batch so the update does not
    # depend on how the batch is split into micro-batches and processes.
    local_masked = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in batches)
    denominator = masked_denominator(local_masked, context)
    sums = torch.zeros(4, dtype=torch.float64, device=context.device)  # loss_sum, correct, masked, real tokens
    for index, batch in enumerate(batches):
        batch = {key: value.to(context.device, non_blocking=True) for key, value in batch.items()}
        sync = index == len(batches) - 1 or not phase.uses_ddp
        with (contextlib.nullcontext() if sync else phase.objective.no_sync()), session.autocast:
            loss_sum, correct, count = phase.objective(**batch)
        session.scaler.scale(loss_sum / denominator).backward()
        sums += torch.stack([loss_sum.detach().double(), correct.double(), count.double(),
                             batch["attention_mask"].sum().double()])
    if context.is_distributed and not phase.uses_ddp:
        average_gradients(phase.parameters, context)
    session.scaler.unscale_(phase.optimizer)
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(phase.parameters, config.grad_clip)
    session.scaler.step(phase.optimizer)
    session.scaler.update()
    phase.optimizer.zero_grad(set_to_none=True)
    all_reduce_sum(sums, context)
    return StepSums(sums, lr), next_sampler


def average_gradients(parameters: list[torch.nn.Parameter], context: DistContext) -> None:
    """What DDP does for the whole model, for the head phase's few tensors: one all-reduce, / ranks."""
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    all_reduce_sum(flat, context)
    flat /= context.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()


class StepSums:
    """One step's sums, copied back from the device as soon as the step is done, without waiting for
    work queued after it: the loop reads step k's while step k + 1 runs, so the GPU is not left idle
    between steps (reading them at once would wait for the device to drain)."""

    def __init__(self, sums: torch.Tensor, lr: float):
        self.lr = lr
        self._ready = None
        if sums.device.type == "cuda":
            self._host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            self._host.copy_(sums, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = sums

    def values(self) -> dict:
        """{lr, loss_sum, correct, masked, tokens}; waits for this step only."""
        if self._ready is not None:
            self._ready.synchronize()
        loss_sum, correct, masked, tokens = self._host.tolist()
        return {"lr": self.lr, "loss_sum": loss_sum, "correct": correct, "masked": masked, "tokens": int(tokens)}


def resolve_micro_batch_size(session: Session, run_dir: Path) -> int:
    """The fixed --micro-batch-size, or auto: a search on CUDA (cached), a sensible size on CPU."""
    config, context = session.config, session.context
    per_rank = config.global_batch_size // context.world_size
    fixed = config.fixed_micro_batch_size
    if fixed is not None:
        if per_rank % fixed:
            raise BadInput(
                f"--global-batch-size {config.global_batch_size} must split evenly into {context.world_size} "
                f"process(es) x --micro-batch-size {fixed}; pick a multiple of {context.world_size * fixed}"
            )
        return fixed
    from cpt.training.autobatch import auto_micro_batch_size

    chosen = auto_micro_batch_size(session, per_rank, run_dir)
    info(f"train: --micro-batch-size auto -> {chosen} ({per_rank // chosen} accumulation steps per update)")
    return chosen


def _train(config: TrainConfig, context: DistContext) -> dict:
    process_started = time.perf_counter()
    run_dir = Path(config.output)
    session = start_session(config, context)
    model = session.model
    state = ckpt.TrainState()
    resume_from = _resume_path(config, run_dir)
    if resume_from is not None:
        _check_compatible(resume_from, session.record)
        state = ckpt.load_checkpoint(resume_from, model, None)
        ckpt.load_optimizer(resume_from, enter_phase(session, state).optimizer)  # the head phase's or the model's
        info(f"train: resumed from {resume_from} (step {state.step}), {state.phase} phase")
        if context.is_main_process:
            _repair_best_pointer(run_dir, resume_from, state.step, config.best_metric)
    metrics_path = run_dir / "metrics.jsonl"
    if context.is_main_process:
        ckpt.checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, state.step if resume_from else -1)
        check_free_disk(run_dir, model, config.keep_checkpoints)
        warn_about_epochs(config, len(session.train_set))
    info(
        f"train: {len(session.train_set)} train / {len(session.val_set)} val sequences, {type(model).__name__} "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {context.device} ({session.precision}), "
        f"global batch {config.global_batch_size} = {context.world_size} x {session.accum_steps} x "
        f"{session.micro_batch_size}"
    )

    def evaluate_on(val_set: ShardSet) -> dict:
        return evaluate_mlm(session.objective, val_set, session.spec, seed=config.seed,
                            max_sequences=config.eval_max_sequences, micro_batch_size=session.micro_batch_size,
                            context=context, autocast=session.autocast, max_width=session.seq_length)

    def evaluate_domain() -> dict:
        return evaluate_on(session.val_set)

    def evaluate_now() -> dict:
        """val_mlm_* on the domain val split; with replay also replay_val_mlm_* on the replay's (forgetting)."""
        metrics = evaluate_domain()
        if session.replay_val_set is not None:
            metrics.update({f"replay_{key}": value for key, value in evaluate_on(session.replay_val_set).items()})
        return metrics

    def log(entry: dict) -> None:
        if context.is_main_process:
            append_metrics(run_dir, entry)

    if state.step == 0 and resume_from is None:
        metrics = evaluate_now()
        info(f"step 0 (base model): val_mlm_loss {metrics['val_mlm_loss']:.4f}, "
             f"val_mlm_acc {metrics['val_mlm_acc']:.4f}" + (f", replay_val_mlm_loss {metrics['replay_val_mlm_loss']:.4f}"
                                                          if "replay_val_mlm_loss" in metrics else ""))
        check = run_head_check(session, metrics["val_mlm_loss"], evaluate_domain)
        state.head.max_steps = start_head_phase(session, check)
        log({"step": 0, "tokens_seen": 0, **metrics, "phase": "base", "head_untrained": check.untrained,
             "head_fresh_val_mlm_loss": check.fresh_val_loss, "head_warmup_max_steps": state.head.max_steps})

    phase = enter_phase(session, state)
    head_eval_every = head_eval_interval(state.head.max_steps, config.eval_interval)
    session.objective.train()
    window = _new_window(0.0)
    in_flight: list[tuple[int, StepSums]] = []  # (step, its sums) not read back yet
    run_started = time.perf_counter() - state.elapsed_s
    deadline = Deadline(config.max_time_s, process_started)
    progress = StepProgress(config.max_steps, state.step)
    # The signal handler first: a signal while the loader processes start still ends in a checkpoint.
    with StopSignal() as stop, batch_feed(session, state.sampler, steps=config.max_steps - state.step) as feed, \
            progress:
        while state.step < config.max_steps:
            step_started = time.perf_counter()
            prepared = feed.next_step()
            step_phase = phase.name
            try:
                sums, next_sampler = train_step(session, state, prepared, phase)
            except torch.OutOfMemoryError:
                raise BadInput(
                    f"CUDA out of memory at micro-batch {session.micro_batch_size} x {session.seq_length} tokens; "
                    "lower --micro-batch-size (or use auto) or add --gradient-checkpointing"
                ) from None
            state.step += 1
            state.sampler = next_sampler
            state.elapsed_s = time.perf_counter() - run_started
            in_flight.append((state.step, sums))
            last_step = state.step == config.max_steps
            out_of_time = broadcast_flag(deadline.must_stop(), context) and not last_step
            is_save = state.step % config.save_interval == 0 or last_step or out_of_time
            # the head phase's own evaluations decide its end; others (--eval/--save-interval, --max-time) only log
            head_eval = step_phase == "head" and (state.step % head_eval_every == 0 or state.step >= state.head.max_steps)
            is_eval = state.step % config.eval_interval == 0 or is_save or head_eval
            is_log = state.step % config.log_interval == 0 or is_eval
            # Read back the finished steps; this one's too where the window is logged or saved.
            _read_back(in_flight, window, state, keep_last=not is_log)
            deadline.observe_step(time.perf_counter() - step_started)
            progress.advance(state.step, f"{step_phase} loss {window['loss_sum'] / window['masked']:.3f}"
                             if window["masked"] else "")

            if is_log:
                seconds = time.perf_counter() - window["started"]
                entry = {
                    "step": state.step, "tokens_seen": state.tokens_seen, "lr": window["lr"],
                    "loss": window["loss_sum"] / max(window["masked"], 1),
                    "mlm_acc": window["correct"] / max(window["masked"], 1),
                    "tokens_per_s": window["tokens"] / max(seconds, 1e-9),
                    "data_wait_share": round(min((feed.wait_s - window["data_wait_s"]) / max(seconds, 1e-9), 1.0), 4),
                    "elapsed_s": round(state.elapsed_s, 3), "phase": step_phase,
                }
                if is_eval:
                    eval_started = time.perf_counter()
                    entry.update(evaluate_now())
                    deadline.observe_eval(time.perf_counter() - eval_started)
                    if head_eval and after_head_eval(state.head, state.step, entry["val_mlm_loss"]):
                        entry["head_warmup_done"] = True
                        info(f"head warm-up done at step {state.step} (val_mlm_loss {entry['val_mlm_loss']:.4f}); "
                             f"training the whole model for the {config.max_steps - state.step} steps left")
                        phase = enter_phase(session, state)
                log(entry)
                progress.line(_progress_text(entry, config.max_steps, state.elapsed_s))
                window = _new_window(feed.wait_s)
                if is_save:
                    save_started = time.perf_counter()
                    _save(run_dir, model, phase.optimizer, state, session.record, config, entry, context)
                    deadline.observe_save(time.perf_counter() - save_started)
            if out_of_time:
                warn(f"--max-time {config.max_time}: stopping at step {state.step} of {config.max_steps} to leave "
                     "time for export; rerun the same command to continue training")
                break
            stopping = broadcast_flag(stop.requested, context)
            if stopping and not last_step:
                _read_back(in_flight, window, state, keep_last=False)
                if not is_save:
                    entry = {"step": state.step, "tokens_seen": state.tokens_seen, "phase": step_phase,
                             **evaluate_now()}
                    log(entry)
                    _save(run_dir, model, phase.optimizer, state, session.record, config, entry, context)
                raise Interrupted(f"interrupted at step {state.step}; checkpoint saved, rerun the same command "
                                  "to resume")
    best = ckpt.best_pointer(run_dir) or {}
    info(f"train: done at step {state.step}; best {best.get('metric')} {best.get('value', float('nan')):.4f} "
         f"at step {best.get('step')}")
    if context.is_main_process:
        print_table("validation", ["checkpoint", "val_mlm_loss", "val_mlm_acc"], summary_rows(metrics_path, best))
    return best


def run_head_check(session: Session, stored_val_loss: float, evaluate) -> HeadCheck:
    """The step-0 check of the base's MLM head (cpt/training/head_warmup.py) on this session's data; `evaluate()`
    scores the model on the val masks the stored loss came from."""
    unigram = unigram_loss(session.train_set, session.val_set, session.model.config.vocab_size,
                           session.spec.special_ids)
    return check_head(session.model, stored_val_loss, evaluate, seed=session.config.seed, unigram=unigram)


def start_head_phase(session: Session, check: HeadCheck) -> int:
    """Say what the step-0 head check found and plan the head phase; returns its step cap (0: none).
    A head that scores worse than a fresh one is re-initialised (the model's own init) before it."""
    config, context = session.config, session.context
    max_head_steps = planned_head_steps(config.head_warmup, check.untrained, config.max_steps)
    reinitialised = bool(max_head_steps) and check.untrained and check.fresh_val_loss < check.stored_val_loss
    if reinitialised:
        reinit_head(session.model, config.seed)
    info(check_line(check, config.head_warmup, max_head_steps, config.head_warmup_lr, reinitialised))
    if check.untrained and not max_head_steps:
        warn(off_warning(check))
    if context.is_main_process:
        write_json_atomic(Path(config.output) / CHECK_FILE, {
            **check.as_record(), "head_warmup": config.head_warmup, "head_warmup_max_steps": max_head_steps,
            "head_warmup_lr": config.head_warmup_lr, "reinitialised": reinitialised})
    return max_head_steps


def _read_back(in_flight: list[tuple[int, StepSums]], window: dict, state: ckpt.TrainState, *, keep_last: bool) -> None:
    """Add the read-back sums of the steps in flight to the window and the state (all of them, or all
    but the newest, which may still be running); stop on a non-finite loss, naming its step."""
    while len(in_flight) > int(keep_last):
        step, sums = in_flight.pop(0)
        values = sums.values()
        if not math.isfinite(values["loss_sum"]):
            raise BadInput(f"training diverged at step {step} (loss {values['loss_sum']}); lower --lr "
                           "or resume from an earlier checkpoint")
        state.tokens_seen += values["tokens"]
        for key in ("loss_sum", "correct", "masked", "tokens"):
            window[key] += values[key]
        window["lr"] = values["lr"]


def _new_window(data_wait_s: float) -> dict:
    """Sums over the steps since the last log line; data_wait_s: the feed's wait total when it began."""
    return {"loss_sum": 0.0, "correct": 0.0, "masked": 0.0, "tokens": 0, "lr": 0.0, "started": time.perf_counter(),
            "data_wait_s": data_wait_s}


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


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """fp32 weights + AdamW's two moments: what one checkpoint takes on disk."""
    return sum(p.numel() for p in model.parameters()) * 4 * 3


def check_free_disk(run_dir: Path, model: torch.nn.Module, keep_checkpoints: int) -> None:
    """Refuse to start when the planned checkpoints and export cannot fit on --output's disk."""
    import shutil

    per_checkpoint = checkpoint_bytes(model)
    weights = per_checkpoint // 3
    # keep + best + one being written, and the export (two weight formats) with its temp copy.
    needed = (keep_checkpoints + 2) * per_checkpoint + 4 * weights
    existing = sum(f.stat().st_size for f in ckpt.checkpoints_dir(run_dir).rglob("*") if f.is_file())
    free = shutil.disk_usage(run_dir).free
    if free + existing < needed:
        raise BadInput(
            f"--output {run_dir}: {free / 2**30:.2f} GiB free, but {keep_checkpoints} checkpoints + best + export "
            f"need about {needed / 2**30:.2f} GiB; free space, use a bigger volume or lower --keep-checkpoints"
        )


def epochs_planned(config: TrainConfig, train_sequences: int) -> float:
    """Epochs over the domain train split (--replay-share's sequences come from the replay corpus)."""
    return config.max_steps * config.global_batch_size * (1.0 - config.replay_share) / max(train_sequences, 1)


def warn_about_epochs(config: TrainConfig, train_sequences: int) -> None:
    epochs = epochs_planned(config, train_sequences)
    if epochs > config.max_epochs:
        replay = f" x {1.0 - config.replay_share:g} (no replay)" if config.replay_share else ""
        warn(f"--max-steps {config.max_steps} x --global-batch-size {config.global_batch_size}{replay} = {epochs:.0f} epochs "
             f"over {train_sequences} sequences (> --max-epochs {config.max_epochs:g}): overfitting the domain text "
             "tends to make the model worse downstream; use more text or fewer steps")


def _repair_best_pointer(run_dir: Path, checkpoint_path: Path, step: int, metric: str) -> None:
    """A kill between renaming step-N/ into place and updating best.json leaves N unconsidered: redo that."""
    metrics = ckpt.read_checkpoint_record(checkpoint_path).get("run", {}).get("metrics", {})
    if metric in metrics and is_better(metric, metrics, ckpt.best_pointer(run_dir)):
        ckpt.write_best_pointer(run_dir, step, metric, metrics)


def _resume_path(config: TrainConfig, run_dir: Path) -> Path | None:
    if config.resume == "auto":
        found = ckpt.step_dirs(run_dir)
        if not found:
            return None
        latest = ckpt.latest_valid_checkpoint(run_dir)
        if latest is None:
            raise BadInput(
                f"{ckpt.checkpoints_dir(run_dir)} holds {len(found)} step dir(s) but no valid checkpoint "
                "(each lacks state.json or a complete file); move them away to start from the base model, "
                "or pass --resume PATH"
            )
        return latest
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
        if is_better(config.best_metric, metrics, ckpt.best_pointer(run_dir)):
            ckpt.write_best_pointer(run_dir, state.step, config.best_metric, metrics)
        ckpt.prune_checkpoints(run_dir, config.keep_checkpoints)
        info(f"checkpoint: {path}")
    barrier(context)


def _progress_text(entry: dict, max_steps: int, elapsed_s: float) -> str:
    step = entry["step"]
    eta_s = elapsed_s / max(step, 1) * (max_steps - step)
    text = (f"step {step}/{max_steps} ({entry.get('phase', 'full')})  loss {entry['loss']:.4f}  "
            f"acc {entry['mlm_acc']:.4f}  lr {entry['lr']:.2e}  "
            f"{entry['tokens_per_s']:.0f} tok/s  eta {eta_s / 60:.1f} min")
    if "val_mlm_acc" in entry:
        text += f"  val_loss {entry['val_mlm_loss']:.4f}  val_acc {entry['val_mlm_acc']:.4f}"
    if "replay_val_mlm_loss" in entry:
        text += f"  replay_val_loss {entry['replay_val_mlm_loss']:.4f}"
    return text


def summary_rows(metrics_path: Path, best: dict) -> list[list[str]]:
    """Rows of the end-of-training table: val metrics at step 0 (the base), at the best and the last step."""
    import json

    evaluated = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and "val_mlm_acc" in json.loads(line)]
    if not evaluated:
        return []
    picks = [("step 0 (base)", evaluated[0]), (f"best: step {best.get('step')}",
             next((m for m in evaluated if m["step"] == best.get("step")), evaluated[-1])),
             (f"last: step {evaluated[-1]['step']}", evaluated[-1])]
    return [[name, f"{m['val_mlm_loss']:.4f}", f"{m['val_mlm_acc']:.4f}"] for name, m in picks]
