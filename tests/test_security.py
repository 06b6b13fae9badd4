"""No untrusted code runs and the base model is never written: pickles with a malicious __reduce__ are refused
wherever cpt reads weights (base model, UER checkpoint, its own checkpoints), remote code in a model dir is never
imported, the source never calls torch.load without weights_only=True nor passes trust_remote_code=True, and a
run leaves the base model dir exactly as it found it (only `--into-base` writes there, after a backup).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import REPO, SAMPLE_CORPUS, prepare_and_tokenize
from typer.testing import CliRunner

from cpt.cli import app
from cpt.common.weights import read_state_dict
from cpt.config import TrainConfig
from cpt.errors import BadInput
from cpt.training import checkpoint as ckpt
from cpt.training.loop import train

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

TRAIN_SETTINGS = dict(micro_batch_size=4, global_batch_size=8, max_steps=2, lr=1e-3, warmup_steps=0,
                      eval_interval=1000, save_interval=2, eval_max_sequences=8, seed=7, device="cpu")


# ---- the source: how weights are loaded --------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_CALLS = {"load", "loads", "Unpickler", "open"}


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((keyword.value for keyword in call.keywords if keyword.arg == name), None)


def _is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_source_loads_weights_only_safely():
    """Every torch.load passes weights_only=True, every from_pretrained local_files_only=True, trust_remote_code
    is never anything but False, np.load never allows pickles, and nothing calls pickle/dill/joblib/marshal loaders."""
    problems, torch_loads, from_pretrained = [], 0, 0
    for path in sorted((REPO / "cpt").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {alias.name for alias in node.names}
                if node.module.split(".")[0] in UNSAFE_MODULES and names & UNSAFE_CALLS:
                    problems.append(f"{where}: imports {sorted(names & UNSAFE_CALLS)} from {node.module}")
                if node.module == "torch" and "load" in names:
                    problems.append(f"{where}: `from torch import load` hides torch.load from this check")
            if not isinstance(node, ast.Call):
                continue
            function = node.func
            attribute = function.attr if isinstance(function, ast.Attribute) else None
            owner = function.value.id if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name) \
                else None
            if owner in UNSAFE_MODULES and attribute in UNSAFE_CALLS:
                problems.append(f"{where}: {owner}.{attribute} unpickles arbitrary objects")
            if (owner, attribute) == ("torch", "load"):
                torch_loads += 1
                if not _is_constant(_keyword(node, "weights_only"), True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            allow_pickle = _keyword(node, "allow_pickle")
            if owner in ("np", "numpy") and attribute == "load" and allow_pickle is not None \
                    and not _is_constant(allow_pickle, False):
                problems.append(f"{where}: np.load with allow_pickle")
            if attribute == "from_pretrained":
                from_pretrained += 1
                if not _is_constant(_keyword(node, "local_files_only"), True):
                    problems.append(f"{where}: from_pretrained without local_files_only=True (cpt never downloads)")
            remote = _keyword(node, "trust_remote_code")
            if remote is not None and not _is_constant(remote, False):
                problems.append(f"{where}: trust_remote_code is not the constant False")
    assert torch_loads >= 1 and from_pretrained >= 2, "the scan found none of the known calls: is it still looking?"
    assert not problems, "\n".join(problems)


# ---- malicious pickles -------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it writes the marker file. A safe loader must never get that far."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def evil_state_dict(marker: Path, like: Path | None = None) -> dict:
    state = dict(read_state_dict(like)) if like is not None else {"bert.embeddings.word_embeddings.weight": torch.ones(2)}
    state["cls.predictions.bias.__evil__"] = Payload(marker)
    return state


def write_evil(path: Path, marker: Path, kind: str, like: Path | None = None) -> None:
    """`kind`: torch.save's zip format, or a plain pickle (the legacy format UER-py files may have)."""
    if kind == "torch-zip":
        torch.save(evil_state_dict(marker, like), path)
    else:
        path.write_bytes(pickle.dumps(evil_state_dict(marker, like)))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_payload_is_real(tmp_path, marker, kind):
    """The payload does run when unpickled unsafely, so the refusals below mean something."""
    write_evil(tmp_path / "evil.bin", marker, kind)
    with open(tmp_path / "evil.bin", "rb") as handle:
        torch.load(handle, weights_only=False) if kind == "torch-zip" else pickle.load(handle)  # noqa: S301
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_read_state_dict_refuses_pickled_code(tmp_path, marker, kind):
    write_evil(tmp_path / "pytorch_model.bin", marker, kind)
    with pytest.raises(BadInput, match="refused to load|cannot read weights"):
        read_state_dict(tmp_path / "pytorch_model.bin")
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained_template(tmp_path_factory, tiny_base_template) -> Path:
    """A tokenized run dir (tokenized/) and the same trained to a checkpoint at step 2 (run/)."""
    root = tmp_path_factory.mktemp("secure")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:60]) + "\n", encoding="utf-8")
    run_dir = root / "run"
    prepare_and_tokenize(run_dir, corpus, tiny_base_template)
    shutil.copytree(run_dir, root / "tokenized")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(output=run_dir, base_model=tiny_base_template, **TRAIN_SETTINGS))
    finally:
        torch.set_num_threads(threads)
    return run_dir


def env_for(run_dir: Path, base: Path, **overrides) -> dict[str, str]:
    settings = {**TRAIN_SETTINGS, **overrides}
    return {"CPT_OUTPUT": str(run_dir), "CPT_BASE_MODEL": str(base),
            **{f"CPT_{key.upper()}": str(value) for key, value in settings.items()}}


def invoke(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(app, args, env=env, catch_exceptions=True)


def _evil_base(tmp, base, marker, kind):
    write_evil(base / "pytorch_model.bin", marker, kind, like=base / "pytorch_model.bin")
    return ["train"], "tokenized", None


def _evil_base_for_export(tmp, base, marker, kind):
    write_evil(base / "pytorch_model.bin", marker, kind, like=base / "pytorch_model.bin")
    return ["export", "--checkpoint", "step-00000002"], "trained", None


def _evil_uer(tmp, base, marker, kind):
    write_evil(tmp / "model.bin-5000", marker, kind)
    return ["convert", "--from", "uer", "--to", "hf", str(tmp / "model.bin-5000"), str(tmp / "out"),
            "--base-model", str(base)], None, None


def _evil_init_from_uer(tmp, base, marker, kind):
    write_evil(tmp / "model.bin-5000", marker, kind)
    return ["train", "--init-from-uer", str(tmp / "model.bin-5000")], "tokenized", None


def _evil_checkpoint_file(name: str):
    """Resume from a checkpoint one of whose files is a malicious pickle."""
    return lambda tmp, base, marker, kind: (["train", "--max-steps", "4"], "trained", name)


def _poison_checkpoint(run_dir: Path, name: str, marker: Path, kind: str) -> None:
    """Replace one file of step-2 with a malicious pickle and re-record its size: the checkpoint stays 'valid'."""
    step = ckpt.step_dir(run_dir, 2)
    write_evil(step / name, marker, kind)
    record = json.loads((step / "state.json").read_text())
    record["files"][name] = (step / name).stat().st_size
    (step / "state.json").write_text(json.dumps(record))


PICKLE_SITES = {
    "base-weights-train": _evil_base,
    "base-weights-export": _evil_base_for_export,
    "uer-convert": _evil_uer,
    "uer-init-from": _evil_init_from_uer,
    "checkpoint-optimizer": _evil_checkpoint_file("optimizer.pt"),
    "checkpoint-rng": _evil_checkpoint_file("rng.pt"),
    "checkpoint-model": _evil_checkpoint_file("model.safetensors"),
}


def run_pickle_site(site: str, kind: str, tmp_path: Path, tiny_base: Path, marker: Path, trained_template: Path):
    args, needs, poisoned_file = PICKLE_SITES[site](tmp_path, tiny_base, marker, kind)
    run_dir = tmp_path / "run"
    if needs == "tokenized":
        shutil.copytree(trained_template.parent / "tokenized", run_dir)
    elif needs == "trained":
        shutil.copytree(trained_template, run_dir)
    if poisoned_file:
        _poison_checkpoint(run_dir, poisoned_file, marker, kind)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return invoke(args, env_for(run_dir, tiny_base))
    finally:
        torch.set_num_threads(threads)


# Where cpt's own loader (cpt.common.weights.read_state_dict) is the one refusing, the error is already a clean exit 3.
CLEAN_TODAY = {"base-weights-export", "uer-convert", "uer-init-from", "checkpoint-model"}


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
@pytest.mark.parametrize("site", list(PICKLE_SITES))
def test_pickled_code_is_refused_everywhere(site, kind, tmp_path, tiny_base, marker, trained_template):
    result = run_pickle_site(site, kind, tmp_path, tiny_base, marker, trained_template)
    assert not marker.exists(), f"{site}: the payload ran"
    assert result.exit_code != 0, f"{site}: a malicious pickle was accepted\n{result.stderr}"
    if site in CLEAN_TODAY:
        assert result.exit_code == 3, f"{result.stderr}\n{result.exception!r}"
        line = [line for line in result.stderr.splitlines() if line.strip()][-1]
        assert line.startswith("cpt: error:") and ("refused to load" in line or "cannot read" in line), line


@pytest.mark.parametrize("site", ["base-weights-train", "checkpoint-optimizer", "checkpoint-rng"])
def test_refused_pickles_are_a_clean_bad_input(site, tmp_path, tiny_base, marker, trained_template):
    result = run_pickle_site(site, "torch-zip", tmp_path, tiny_base, marker, trained_template)
    assert not marker.exists()
    assert result.exit_code == 3, f"{result.stderr}\n{result.exception!r}"


# ---- remote code in a model dir ----------------------------------------------------------------------------

EVIL_MODULE = "open({marker!r}, 'w').write('imported')\n"


def test_remote_code_in_the_base_dir_is_never_imported(tmp_path, tiny_base, marker, trained_template):
    """A base dir whose config and tokenizer config point at Python files of their own (auto_map): cpt trains
    and tokenizes with the built-in BERT classes or refuses; the files are never imported."""
    for module in ("modeling_evil", "configuration_evil", "tokenization_evil"):
        (tiny_base / f"{module}.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    config = json.loads((tiny_base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForMaskedLM": "modeling_evil.EvilForMaskedLM"}
    (tiny_base / "config.json").write_text(json.dumps(config))
    (tiny_base / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))

    run_dir = tmp_path / "run"
    shutil.copytree(trained_template.parent / "tokenized", run_dir)
    tokenized = invoke(["tokenize", "--max-seq-length", "64", "--workers", "1"], env_for(run_dir, tiny_base))
    assert not marker.exists(), "tokenize imported code from the base dir"
    print("tokenize with a remote-code tokenizer:", tokenized.exit_code, tokenized.stderr.strip().splitlines()[-1:])
    assert tokenized.exit_code in (0, 3), f"{tokenized.stderr}\n{tokenized.exception!r}"

    (tiny_base / "tokenizer_config.json").unlink()  # the model side alone
    trained = invoke(["train", "--max-steps", "1", "--save-interval", "1"], env_for(run_dir, tiny_base))
    assert not marker.exists(), "train imported code from the base dir"
    print("train with a remote-code model:", trained.exit_code, trained.stderr.strip().splitlines()[-1:])
    assert trained.exit_code in (0, 3), f"{trained.stderr}\n{trained.exception!r}"


# ---- the base model dir is read, never written -------------------------------------------------------------


def fingerprint(root: Path) -> dict[str, tuple]:
    """Every entry under root (root included): kind, mode, size, mtime and content hash. A file created and
    deleted again still shows, as its directory's mtime."""
    entries = {}
    for path in [root, *(sorted(root.rglob("*")) if root.is_dir() else [])]:
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else ""
        entries[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_size,
                                                info.st_mtime_ns, digest)
    return entries


def make_read_only(root: Path) -> dict[Path, int]:
    """chmod a-w (stops non-root CI; root ignores it, which is why the fingerprint is compared as well)."""
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in [root, *(root.rglob("*") if root.is_dir() else [])]}
    for path, mode in sorted(modes.items(), key=lambda item: -len(item[0].parts)):
        os.chmod(path, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return modes


def restore_modes(modes: dict[Path, int]) -> None:
    for path, mode in sorted(modes.items(), key=lambda item: len(item[0].parts)):
        os.chmod(path, mode)


@pytest.mark.slow
def test_a_run_never_writes_to_the_base_model_or_the_corpus(tmp_path, tiny_base, small_corpus):
    modes = make_read_only(tiny_base)
    corpus_mode = make_read_only(small_corpus)
    base_before, corpus_before = fingerprint(tiny_base), fingerprint(small_corpus)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = invoke(["run", "--corpus", str(small_corpus), "--max-seq-length", "64", "--workers", "1",
                         "--val-fraction", "0.1", "--eval-max-sequences", "8"],
                        env_for(tmp_path / "run", tiny_base))
        assert result.exit_code == 0, f"{result.stderr}\n{result.exception!r}"
        assert fingerprint(tiny_base) == base_before, "cpt run wrote into the base model dir"
        assert fingerprint(small_corpus) == corpus_before, "cpt run wrote to the corpus"
    finally:
        torch.set_num_threads(threads)
        restore_modes(modes)
        restore_modes(corpus_mode)

    # --into-base is the one writer: it keeps the originals byte for byte and touches nothing but weights.
    original_weights = (tiny_base / "pytorch_model.bin").read_bytes()
    others = {name: entry for name, entry in fingerprint(tiny_base).items() if name not in (".", "pytorch_model.bin")}
    into = invoke(["export", "--into-base"], env_for(tmp_path / "run", tiny_base))
    assert into.exit_code == 0, f"{into.stderr}\n{into.exception!r}"
    after = fingerprint(tiny_base)
    backups = [name for name in after if name.startswith("pytorch_model.bin.before-cpt-")]
    assert len(backups) == 1 and (tiny_base / backups[0]).read_bytes() == original_weights
    assert {name: entry for name, entry in after.items() if name in others} == others
    assert set(after) == {".", "pytorch_model.bin", backups[0], *others}
    assert (tiny_base / "pytorch_model.bin").read_bytes() != original_weights
