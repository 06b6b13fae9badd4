"""Run ../shared/bench/hf_trainer_mlm.py unchanged, but also print a line at the end of every
optimizer step, so the harness can read its CPU time per step like the other tools'.

    python bench/hf_clock.py --config CONFIG.json --vocab VOCAB.txt --corpus CORPUS.txt ...

Arguments are the script's own; its training and its final JSON line are untouched.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

SCRIPT = Path(os.environ.get("CPT_BENCH_HF_SCRIPT", Path(__file__).resolve().parents[2] / "shared" / "bench"
                              / "hf_trainer_mlm.py"))


def main() -> None:
    spec = importlib.util.spec_from_file_location("hf_trainer_mlm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class PrintingClock(module.StepClock):
        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            print(f"hf-step {state.global_step} {time.perf_counter():.4f}", file=sys.stderr, flush=True)

    module.StepClock = PrintingClock
    sys.argv = [str(SCRIPT), *sys.argv[1:]]
    module.main()


if __name__ == "__main__":
    main()
