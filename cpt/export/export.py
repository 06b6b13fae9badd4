"""Stage 4, `cpt export --output RUN_DIR --base-model DIR`: a checkpoint -> RUN_DIR/model/.

The result replaces the base model: the base's config and tokenizer files, and weights holding
EVERY key of the base checkpoint, trained ones updated and the rest (pooler, NSP head) copied
bit-identical. Weights as model.safetensors and/or pytorch_model.bin (the UER-py workflow's
drop-in name). Written to a temp dir, verified by reloading with transformers and comparing
logits with the checkpoint's, then renamed into place (cpt/export/hf_dir.py). `--into-base` also puts
the weights into the base model dir, keeping the originals as `<name>.before-cpt-<timestamp>` (never deleted).

A run tokenized with `--extend-vocab` trained a model with more word embeddings than the base: the
export takes the grown tensors (word embeddings, decoder, output bias) from the checkpoint, the vocab.txt /
tokenizer.json from RUN_DIR/tokenizer/ and sets config.json's vocab_size (cpt/data/vocab.py), so the dir loads
in transformers with the new tokens.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from cpt.common.files import atomic_path, read_json, sha256_file, write_json_atomic
from cpt.common.runtime import info, warn
from cpt.common.weights import WEIGHT_FILE_NAMES, find_weights_file, read_state_dict, write_state_dict
from cpt.config import ExportConfig
from cpt.data import vocab as vocab_extension
from cpt.errors import BadInput
from cpt.export.hf_dir import BACKUP_MARK, WEIGHT_FORMATS, other_weight_files, stray_files, write_hf_dir
from cpt.training import checkpoint as ckpt


def choose_checkpoint(run_dir: Path, which: str) -> Path:
    if which == "best":
        best = ckpt.best_pointer(run_dir)
        if best is None:
            raise BadInput(f"{run_dir}/best.json is missing; train first (`cpt train` or `cpt run`)")
        path = ckpt.step_dir(run_dir, int(best["step"]))
    elif which == "latest":
        path = ckpt.latest_valid_checkpoint(run_dir)
        if path is None:
            raise BadInput(f"{run_dir}/checkpoints holds no valid checkpoint; train first")
    else:
        path = ckpt.checkpoints_dir(run_dir) / which
    if not ckpt.is_valid_checkpoint(path):
        raise BadInput(f"--checkpoint {which}: {path} is missing or incomplete; pick another (best, latest, step-N)")
    return path


def merge_into_base(base_state: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                    vocab_sizes: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Every key of the base, with trained values where the trained model has that key.

    vocab_sizes (base, extended): with an extended vocab, tensors indexed by token id grew from base to
    extended rows; the trained (grown) one is taken, and such a tensor the trained model lacks is an error."""
    merged = {}
    for name, base_tensor in base_state.items():
        new = trained.get(name)
        grown = vocab_sizes is not None and base_tensor.ndim >= 1 and base_tensor.shape[0] == vocab_sizes[0]
        if new is None and grown:
            raise BadInput(f"checkpoint lacks {name}, which has one row per token and must grow to the extended vocab")
        if new is None:
            merged[name] = base_tensor
            continue
        if grown and new.shape == (vocab_sizes[1], *base_tensor.shape[1:]):
            merged[name] = new.to(base_tensor.dtype)
            continue
        if new.shape != base_tensor.shape:
            raise BadInput(f"checkpoint tensor {name} has shape {tuple(new.shape)} but the base has "
                           f"{tuple(base_tensor.shape)}; export with the base model it was trained from")
        merged[name] = new.to(base_tensor.dtype)
    return merged


def export_model(config: ExportConfig) -> Path:
    run_dir = Path(config.output)
    base_dir = Path(config.base_model)
    checkpoint_path = choose_checkpoint(run_dir, config.checkpoint)
    target = run_dir / "model"
    request = {"checkpoint": checkpoint_path.name,
               "checkpoint_model_sha256": sha256_file(checkpoint_path / "model.safetensors"),
               "base_weights_sha256": sha256_file(find_weights_file(base_dir)), "format": config.format}
    previous = read_json(run_dir / "export.json")
    # An export of an older cpt may hold the base's other-format weights: redo it then.
    if previous and previous.get("request") == request and target.is_dir() and not stray_files(target):
        info(f"export: {target} is up to date ({checkpoint_path.name})")
    else:
        _export(base_dir, checkpoint_path, target, config.format)
        left_out = other_weight_files(base_dir)
        if left_out:
            info(f"export: left out the base's {', '.join(left_out)}: they hold the base's weights, not the "
                 "trained ones (the export has PyTorch weights only)")
        write_json_atomic(run_dir / "export.json", {"request": request, "model_dir": str(target)})
        info(f"export: {checkpoint_path.name} -> {target}")
    if config.into_base:
        put_into_base(target, base_dir, config.format)
    return target


def _export(base_dir: Path, checkpoint_path: Path, target: Path, weight_format: str) -> None:
    base_state = read_state_dict(find_weights_file(base_dir))
    trained = read_state_dict(checkpoint_path / "model.safetensors")
    run_dir = target.parent  # target is RUN_DIR/model
    shards_manifest = read_json(run_dir / "shards" / "manifest.json") or {}
    extension = shards_manifest.get("vocab_extension") if vocab_extension.added_tokens(shards_manifest) else None
    vocab_sizes = (extension["base_vocab_size"], extension["vocab_size"]) if extension else None
    merged = merge_into_base(base_state, trained, vocab_sizes)
    tokenizer_files, config_updates = vocab_extension.export_overrides(run_dir, shards_manifest)
    # The previous export stays in place until this one is written and verified (a kill mid-swap is undone
    # by the next export).
    write_hf_dir(target, base_dir, merged, weight_format=weight_format, tokenizer_files=tokenizer_files,
                 config_updates=config_updates, verify=lambda model_dir: verify_export(model_dir, checkpoint_path, base_dir),
                 replace=True)


def verify_export(model_dir: Path, checkpoint_path: Path, base_dir: Path) -> None:
    """Reload the export with transformers; its logits must equal the checkpoint's."""
    from cpt.common.base_model import load_tokenizer
    from cpt.common.weights import read_state_dict as read
    from cpt.training.model import load_mlm_model

    load_tokenizer(model_dir)  # its tokenizer loads and has config.json's vocab_size entries
    exported = load_mlm_model(model_dir).eval()
    reference = load_mlm_model(base_dir).eval()
    trained = read(checkpoint_path / "model.safetensors")
    vocab_size = exported.config.vocab_size
    if vocab_size != reference.config.vocab_size:  # an extended vocab: grow the base's rows first
        reference.resize_token_embeddings(vocab_size, mean_resizing=False)
    reference.load_state_dict(trained, strict=False)
    reference.tie_weights()
    # ordinary ids and the last ones of the vocab (the added tokens when it was extended)
    input_ids = torch.cat((torch.arange(100, 116), torch.arange(vocab_size - 8, vocab_size))).unsqueeze(0)
    with torch.no_grad():
        got = exported(input_ids=input_ids).logits
        want = reference(input_ids=input_ids).logits
    if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
        raise BadInput(f"export check failed: {model_dir} does not reproduce {checkpoint_path}'s logits "
                       f"(max diff {(got - want).abs().max().item():.2e})")


def put_into_base(model_dir: Path, base_dir: Path, weight_format: str) -> list[Path]:
    """The seed's last step, made safe: back each base weights file up, then put the new one there."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = [name for name in WEIGHT_FILE_NAMES if (base_dir / name).is_file()] or list(WEIGHT_FORMATS[weight_format])
    written = []
    for name in names:
        source = model_dir / name
        if not source.is_file():
            write_state_dict(read_state_dict(next(model_dir / n for n in WEIGHT_FILE_NAMES if (model_dir / n).is_file())),
                             model_dir / name)
        written.append(_replace_keeping_original(source, base_dir / name, stamp))
    written.extend(_put_vocab_into_base(model_dir, base_dir, stamp))
    stale = other_weight_files(base_dir)
    if stale:
        warn(f"{base_dir}: {', '.join(stale)} were left as they were (--into-base replaced {', '.join(names)} "
             "only): weights of other frameworks there are still the base's; move them out, or use "
             f"{model_dir}, which has the trained PyTorch weights only")
    return written


def _replace_keeping_original(source: Path, original: Path, stamp: str) -> Path:
    """Keep `original` (if any) as NAME.before-cpt-STAMP, then put a copy of `source` there atomically: the
    backup is a second name of the original file (a hard link; a copy where links are not supported), so
    NAME never goes missing, even when the export is killed half-way."""
    with atomic_path(original) as tmp:
        shutil.copyfile(source, tmp)
        if original.exists():
            backup = _backup_name(original, stamp)
            try:
                os.link(original, backup)
            except OSError:
                shutil.copy2(original, backup)
            info(f"export: kept the original {original.name} as {backup}")
    return original


def _backup_name(original: Path, stamp: str) -> Path:
    """NAME.before-cpt-STAMP; -2, -3, ... after it when an --into-base in the same second already took it."""
    backup, attempt = original.with_name(f"{original.name}{BACKUP_MARK}{stamp}"), 1
    while os.path.lexists(backup):
        attempt += 1
        backup = original.with_name(f"{original.name}{BACKUP_MARK}{stamp}-{attempt}")
    return backup


def _put_vocab_into_base(model_dir: Path, base_dir: Path, stamp: str) -> list[Path]:
    """With an extended vocab (--extend-vocab) the weights need the export's vocab.txt / tokenizer.json and
    config.json (vocab_size) beside them: those are put into the base dir too, the originals kept likewise."""
    if (read_json(model_dir / "config.json") or {}).get("vocab_size") == \
            (read_json(base_dir / "config.json") or {}).get("vocab_size"):
        return []
    written = []
    for name in ("vocab.txt", "tokenizer.json", "config.json"):  # config.json last: the weights fit it then
        source, original = model_dir / name, base_dir / name
        if not source.is_file() or (original.is_file() and original.read_bytes() == source.read_bytes()):
            continue
        written.append(_replace_keeping_original(source, original, stamp))
    return written
