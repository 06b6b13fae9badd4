"""A larger corpus made from a small real one, for scaling runs of the data pipeline.

    python bench/synth.py ../shared/data/clue_small_2500.txt /tmp/synth-200mb.txt --mb 200

Copy k of each document has its sentences rotated by k and a short copy tag, so every line is
unique (`cpt prepare` deduplicates, and an exact copy would be dropped) while the characters,
words and document lengths stay those of the real text.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_SENTENCE_END = re.compile(r"(?<=[。！？!?])")


def _sentences(line: str) -> list[str]:
    return [part for part in _SENTENCE_END.split(line) if part]


def build_corpus(source: Path, output: Path, target_bytes: int) -> dict:
    """Write at least target_bytes (whole lines) to output; returns {"bytes", "chars", "documents"}."""
    documents = [_sentences(line.strip()) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    written_bytes = chars = count = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as handle:
        copy = 0
        while written_bytes < target_bytes:
            for sentences in documents:
                shift = copy % len(sentences)
                text = "".join(sentences[shift:] + sentences[:shift])
                line = f"{text}（{copy}）\n" if copy else f"{text}\n"
                handle.write(line)
                written_bytes += len(line.encode("utf-8"))
                chars += len(line) - 1
                count += 1
                if written_bytes >= target_bytes:
                    break
            copy += 1
    return {"bytes": written_bytes, "chars": chars, "documents": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--mb", type=float, required=True, help="size of the output in MiB")
    args = parser.parse_args()
    print(build_corpus(args.source, args.output, int(args.mb * (1 << 20))))


if __name__ == "__main__":
    main()
