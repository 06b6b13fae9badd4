"""UER-py, run side by side with cpt: its preprocess.py (static masks, dup_factor copies) and its
pretrain.py on CPU. Nothing of UER-py is copied into this repository; pass a local checkout.

    uer = UerSide(Path("/tmp/UER-py"), python="/tmp/uer-venv/bin/python")
    uer.check()                      # None, or why the UER column must be skipped
    uer.preprocess(work, corpus, vocab, dup_factor=5, processes=2, seq_length=128)
    uer.pretrain(work, dataset, vocab, steps=60, batch_size=16)

UER-py reads models/special_tokens_map.json relative to the working directory and writes its
dataset-tmp-N.pt files there, so every run gets its own directory with a `models` link.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness import RunResult, run_measured

# The 4-layer / 256-hidden / 4-head BERT of cpt's `init-base --preset small`, in UER-py's terms.
SMALL_BERT = {
    "emb_size": 256, "feedforward_size": 1024, "hidden_size": 256, "hidden_act": "gelu", "heads_num": 4,
    "layers_num": 4, "max_seq_length": 512, "dropout": 0.1, "data_processor": "mlm",
    "embedding": ["word", "pos", "seg"], "encoder": "transformer", "mask": "fully_visible", "target": ["mlm"],
    "tie_weights": True,
}


def optional_uer_side(uer_path: Path | None, python: str, who: str) -> UerSide | None:
    """The UER-py side of a benchmark, or None (with a printed reason) when no usable checkout was given."""
    if not uer_path:
        return None
    uer = UerSide(Path(uer_path).resolve(), python)
    reason = uer.check()
    if reason:
        print(f"{who}: skipping UER-py: {reason}")
        return None
    return uer


REPORT_LINE = re.compile(r"\|\s*(\d+)/\s*(\d+) steps\|\s*([\d.]+) tokens/s")


@dataclass
class UerSide:
    root: Path
    python: str

    def check(self) -> str | None:
        """None when UER-py can run here, else a one-line reason."""
        if not (self.root / "preprocess.py").is_file() or not (self.root / "pretrain.py").is_file():
            return f"{self.root} is not a UER-py checkout (no preprocess.py / pretrain.py)"
        probe = subprocess.run([self.python, "-c", "import six, packaging, regex, numpy, torch, jieba"],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            return f"{self.python} lacks UER-py's requirements ({last})"
        return None

    def revision(self) -> str | None:
        result = subprocess.run(["git", "-C", str(self.root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False)
        return result.stdout.strip() or None

    def _workdir(self, work: Path) -> Path:
        work.mkdir(parents=True, exist_ok=True)
        link = work / "models"
        if not link.exists():
            link.symlink_to(self.root / "models")
        return work

    def preprocess(self, work: Path, corpus: Path, vocab: Path, *, dup_factor: int, processes: int,
                   seq_length: int) -> tuple[RunResult, Path]:
        """Whole-word + span masking, as a UER-py user of Chinese BERT would run it."""
        work = self._workdir(work)
        dataset = work / "dataset.pt"
        command = [
            self.python, self.root / "preprocess.py", "--corpus_path", corpus, "--vocab_path", vocab,
            "--dataset_path", dataset, "--processes_num", str(processes), "--data_processor", "mlm",
            "--whole_word_masking", "--span_masking", "--seq_length", str(seq_length), "--dup_factor", str(dup_factor),
        ]
        result = run_measured(command, cwd=work, log_path=work / "preprocess.log", env={"PYTHONPATH": str(self.root)})
        # UER-py's workers swallow their exceptions (Pool.apply_async without .get()): check the output too.
        if result.returncode == 0 and (not dataset.is_file() or dataset.stat().st_size == 0
                                       or any("Traceback" in line.text for line in result.lines)):
            result.returncode = 99
        return result, dataset

    def pretrain(self, work: Path, dataset: Path, vocab: Path, *, steps: int, batch_size: int,
                 report_steps: int, env: dict | None = None) -> RunResult:
        work = self._workdir(work)
        config = work / "bert_small.json"
        config.write_text(json.dumps(SMALL_BERT, indent=1), encoding="utf-8")
        command = [
            self.python, self.root / "pretrain.py", "--dataset_path", dataset, "--vocab_path", vocab,
            "--config_path", config, "--output_model_path", work / "model.bin", "--world_size", "1",
            "--total_steps", str(steps), "--report_steps", str(report_steps), "--save_checkpoint_steps", "100000000",
            "--batch_size", str(batch_size), "--data_processor", "mlm",
        ]  # no --gpu_ranks: UER-py's CPU mode
        return run_measured(command, cwd=work, log_path=work / "pretrain.log",
                            env={"PYTHONPATH": str(self.root), **(env or {})})


def report_windows(result: RunResult) -> list[dict]:
    """UER-py's own report lines: step at the window's end, its tokens/s (batch x padded length) and when."""
    windows = []
    for line in result.lines:
        match = REPORT_LINE.search(line.text)
        if match:
            windows.append({"step": int(match.group(1)), "tokens_per_s": float(match.group(3)), "t": line.t})
    return windows
