"""`cpt probe`: learns a separable task, the same recipe for every model, label files read right, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from cpt.cli import app
from cpt.config import ProbeConfig
from cpt.errors import BadInput
from cpt.tools.probe import macro_f1, probe_models, read_labelled

# Two classes written with disjoint characters: separable by any encoder that tells characters apart.
CLASS_CHARS = {"0": "山水花草树木云雨风雪", "1": "车船路桥机电钢铁油煤"}


def write_task(path, examples: int, seed: int, header: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    rows = [header] if header else []
    for index in range(examples):
        label = str(index % 2)
        text = "".join(rng.choice(list(CLASS_CHARS[label]), size=int(rng.integers(6, 14))))
        rows.append(f"{label}\t{text}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_probe_learns_a_separable_task_with_the_same_recipe_for_every_model(tiny_base, tmp_path):
    write_task(tmp_path / "train.tsv", 160, seed=0)
    write_task(tmp_path / "test.tsv", 80, seed=1)
    settings = ProbeConfig(train=tmp_path / "train.tsv", test=tmp_path / "test.tsv", steps=30, batch_size=16,
                             lr=1e-3, max_seq_length=32, seed=3)
    report = probe_models([tiny_base, tiny_base], settings)
    first, second = report["models"]
    assert first["accuracy"] >= 0.9 and first["macro_f1"] >= 0.9, first
    assert first == second, "same seed and settings: the same head, batches and dropout for every model"
    assert report["data"] == {"train_examples": 160, "test_examples": 80, "classes": ["0", "1"],
                              "majority_accuracy": 0.5}


def test_reads_book_review_layout_without_header(shared_data):
    examples = read_labelled(shared_data / "book_review_cls.tsv")
    assert len(examples) == 20000
    assert {label for label, _text in examples} == {"0", "1"}
    assert examples[0][0] == "1" and examples[0][1].startswith("冷酷无情")


def test_header_names_and_guesses(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("id,review,sentiment\n1,好看,pos\n2,难看,neg\n", encoding="utf-8")
    assert read_labelled(path) == [("pos", "好看"), ("neg", "难看")]
    assert read_labelled(path, text_column="review", label_column="0") == [("1", "好看"), ("2", "难看")]
    with pytest.raises(BadInput, match="--label-column 'stars' is missing"):
        read_labelled(path, label_column="stars")


def test_macro_f1():
    true = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    # class 0: P 1/2 R 1/2 F 1/2; class 1: P 2/3 R 1 F 4/5; class 2: F 0
    assert macro_f1(true, predicted) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


@pytest.mark.parametrize(
    ("problem", "fragment"),
    [("model", "--model /nonexistent/model: no such directory"), ("train", "--train /nonexistent/train.tsv"),
     ("label", "no label column in the header"), ("one_column", "a labelled file needs a label and a text column")],
)
def test_bad_inputs_exit_3_with_one_line(tiny_base, tmp_path, problem, fragment):
    write_task(tmp_path / "test.tsv", 10, seed=1)
    train = tmp_path / "train.tsv"
    if problem == "label":
        write_task(train, 10, seed=0, header="stars\ttext")
        train.write_text(train.read_text(encoding="utf-8").replace("stars", "score"), encoding="utf-8")
    elif problem == "one_column":
        train.write_text("只有文本没有标签\n另一行\n", encoding="utf-8")
    else:
        write_task(train, 10, seed=0)
    args = ["probe", "--model", "/nonexistent/model" if problem == "model" else str(tiny_base),
            "--train", "/nonexistent/train.tsv" if problem == "train" else str(train), "--test", str(tmp_path / "test.tsv"),
            "--steps", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cpt: error:") and fragment in lines[0], lines
