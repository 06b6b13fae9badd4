"""A training session: the inputs checked and the model, optimizer, precision and data built once, for the
training loop (cpt/training/loop.py) and for what measures it (`cpt plan`, bench/).

    session = start_session(config, context)          # Session: model, objective, optimizer, shards, ...
    with batch_feed(session, state.sampler, steps=10) as feed:
        sums, state.sampler = train_step(session, state, feed.next_step())   # cpt.training.step

What is decided here, and logged: the precision (`autocast_for`), the unpadded path (`resolve_unpad`),
torch.compile, the micro-batch size (`resolve_micro_batch_size`) and the CPU speed-ups (cpt/training/cpu.py).
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from cpt.common.base_model import check_fits_positions, tokenizer_fingerprint
from cpt.common.files import require_manifest
from cpt.common.runtime import info, warn
from cpt.config import TrainConfig
from cpt.data.replay import replay_shards_dir
from cpt.data.shards import ShardSet, require_current_format
from cpt.data.vocab import training_tokenizer
from cpt.errors import BadInput
from cpt.training import checkpoint as ckpt
from cpt.training.batches import BatchFeed, MaskingSpec, SamplerState, StepBatching, masking_spec_for
from cpt.training.cpu import cpu_has_native_bf16, tune_cpu_training
from cpt.training.distributed import DistContext
from cpt.training.model import UER_INIT_DIR, MaskedLMObjective, load_mlm_model, parameter_groups, resize_for_extension
from cpt.training.resume import run_record

# Training batches carry their unpadding metadata (index tensors of the real and the masked tokens), built in
# the loader processes on the host: the CUDA step then makes no host-device sync to find them (issue 17). The
# same on every device, so the CPU tests run the path the GPU trains on; the loss is bit-identical without it.
LOADER_BUILDS_METADATA = True

@dataclass
class Session:
    """Everything a training step needs, built once by `start_session`."""

    config: TrainConfig
    context: DistContext
    model: torch.nn.Module
    objective: torch.nn.Module  # the model's MLM loss (DDP-wrapped under torchrun)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager
    precision: str
    train_set: ShardSet
    val_set: ShardSet
    spec: MaskingSpec
    record: dict  # what a checkpoint records of the run (cpt.training.resume.run_record)
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
                            replay_share=self.config.replay_share, opened_replay=self.replay_train_set,
                            with_unpadding_metadata=LOADER_BUILDS_METADATA)


def start_session(config: TrainConfig, context: DistContext) -> Session:
    """Check the inputs and build model, optimizer and data for training (or for a timing probe)."""
    run_dir = Path(config.output)
    shards_manifest, spec = check_shards(config, context)
    train_set, val_set = ShardSet(run_dir / "shards", "train"), ShardSet(run_dir / "shards", "val")
    if len(train_set) == 0:
        raise BadInput(f"{run_dir}/shards/train holds no sequence; pass a larger corpus")
    replay_manifest, replay_train_set, replay_val_set = open_replay(config, shards_manifest)
    model = load_initial_model(config, context.device, shards_manifest)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.999), eps=1e-6, fused=True)  # fused kernels: CUDA and CPU
    # The precision first: whether the unpadded path's flash kernel can run depends on it.
    autocast, precision = autocast_for(context.device, config.precision)
    objective = MaskedLMObjective(model, unpad=resolve_unpad(config.unpad, model, context.device, precision))
    session = Session(config=config, context=context, model=model, objective=objective, optimizer=optimizer,
                      scaler=torch.amp.GradScaler("cuda", enabled=precision == "fp16"), autocast=autocast,
                      precision=precision, train_set=train_set, val_set=val_set, spec=spec,
                      record=run_record(config, shards_manifest, replay_manifest), micro_batch_size=1,
                      seq_length=shards_manifest["settings"]["max_seq_length"], replay_train_set=replay_train_set,
                      replay_val_set=replay_val_set)
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


def check_shards(config: TrainConfig, context: DistContext) -> tuple[dict, MaskingSpec]:
    """RUN_DIR/shards' manifest, checked against the base model (tokenizer, positions) and the process count,
    and the masking spec for its tokenizer."""
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
    seq_length = shards_manifest["settings"]["max_seq_length"]
    check_fits_positions(seq_length, config.base_model, what=f"the shards' --max-seq-length {seq_length}",
                         fix="retokenize with --max-seq-length {positions}")
    return shards_manifest, masking_spec_for(tokenizer, config.masking, config.mask_prob, config.span_p,
                                             config.span_max)


def load_initial_model(config: TrainConfig, device: torch.device, shards_manifest: dict) -> torch.nn.Module:
    """The base model (with --init-from-uer, the UER weights converted before training), grown for
    --extend-vocab, with gradient checkpointing and the CPU speed-ups as configured."""
    model = load_mlm_model(config.base_model, device, weights=uer_init_weights(config))
    resize_for_extension(model, shards_manifest)  # --extend-vocab: new embedding/decoder/bias rows
    if config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if device.type == "cpu":
        tune_cpu_training(model, compiled=config.compile)  # each measured in docs/benchmarks.md
    return model


def uer_init_weights(config: TrainConfig) -> Path | None:
    """--init-from-uer: RUN_DIR/uer-init/model.safetensors, which the train stage (cpt.pipeline.train_stage)
    converts from the UER file before training starts; None without the flag."""
    if config.init_from_uer is None:
        return None
    converted = Path(config.output) / UER_INIT_DIR
    if not (converted / "model.safetensors").is_file():
        raise BadInput(f"--init-from-uer {config.init_from_uer}: {converted} holds no converted model; run "
                       f"`cpt convert --from uer --to hf {config.init_from_uer} {converted} --base-model "
                       f"{config.base_model}` first (`cpt train` and `cpt run` do this themselves)")
    return converted / "model.safetensors"


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


def loader_workers(config: TrainConfig, device: torch.device) -> int:
    """--loader-workers, where -1 (auto) means 2 loader processes on CUDA and none on CPU (where they
    would only take cores from the model's math)."""
    return config.loader_workers if config.loader_workers >= 0 else 2 * (device.type == "cuda")


def batch_feed(session: Session, sampler: SamplerState, steps: int) -> BatchFeed:
    """The batches of the next `steps` steps from `sampler` on, built as --loader-workers says."""
    return BatchFeed(session.batching, sampler, workers=loader_workers(session.config, session.context.device),
                     steps=steps, pin_memory=session.context.device.type == "cuda")


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """fp32 weights + AdamW's two moments: what one checkpoint takes on disk."""
    return sum(p.numel() for p in model.parameters()) * 4 * 3


def check_free_disk(run_dir: Path, model: torch.nn.Module, keep_checkpoints: int) -> None:
    """Refuse to start when the planned checkpoints and export cannot fit on --output's disk."""
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
