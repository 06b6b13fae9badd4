"""Layout figures for a source tree: longest functions, the train loop's size, and how many places
each cross-cutting fact lives in. Used for the layout issue's before/after table.

    python tools/layout_stats.py [SRC_DIR]   # default: cpt
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

# A fact "lives" in a function when its body matches every pattern given; one count per function.
FACTS = {
    "reads RANK/WORLD_SIZE env": [r"environ(?:\.get)?\(?\[?[\"'](?:RANK|WORLD_SIZE|LOCAL_RANK)[\"']"],
    "parses metrics.jsonl": [r"metrics", r"json\.loads\("],
    "checks max_position_embeddings": [r"\.get\([\"']max_position_embeddings[\"']"],
    "atomic write (tmp + rename)": [r"os\.replace\(|\.rename\("],
}


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def fact_places(path: Path, source: str, tree: ast.AST, patterns: list[str]) -> list[str]:
    lines = source.splitlines()
    innermost: dict[int, str] = {}
    for fn in sorted(functions(tree), key=lambda f: f.end_lineno - f.lineno, reverse=True):
        for line_no in range(fn.lineno, fn.end_lineno + 1):
            innermost[line_no] = fn.name  # shorter (inner) functions overwrite outer ones
    bodies: dict[str, str] = {}
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("#"):
            owner = innermost.get(i + 1, "<module>")
            bodies[owner] = bodies.get(owner, "") + line + "\n"
    return sorted(f"{path}:{owner}" for owner, body in bodies.items()
                  if all(re.search(pattern, body) for pattern in patterns))


def main(src: str = "cpt") -> None:
    rows, facts = [], {name: [] for name in FACTS}
    for path in sorted(Path(src).rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        rows += [(fn.end_lineno - fn.lineno + 1, f"{path}:{fn.name}") for fn in functions(tree)]
        for name, pattern in FACTS.items():
            facts[name] += fact_places(path, source, tree, pattern)
    print(f"modules: {len(list(Path(src).rglob('*.py')))}, lines: "
          f"{sum(len(p.read_text(encoding='utf-8').splitlines()) for p in Path(src).rglob('*.py'))}")
    print("longest functions (lines):")
    for length, name in sorted(rows, reverse=True)[:10]:
        print(f"  {length:4d}  {name}")
    for name, places in facts.items():
        print(f"{name}: {len(places)} places")
        for place in places:
            print(f"    {place}")


if __name__ == "__main__":
    main(*sys.argv[1:])
