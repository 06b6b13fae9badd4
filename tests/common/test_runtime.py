"""common/runtime: where the process runs and how a distributed worker leaves."""

import subprocess
import sys

LEAVES_WITH_3 = """
import atexit, sys
atexit.register(lambda: print("interpreter shutdown ran", file=sys.stderr))
from cpt.common.runtime import leave_process
print("written before leaving", end="")
print("error line", file=sys.stderr, end="")
leave_process(3)
"""


def test_leave_process_flushes_output_and_skips_interpreter_shutdown():
    """Buffered output still arrives (a pipe is block-buffered), the code is kept, and nothing registered for
    shutdown runs: that shutdown is where gloo's teardown aborted finished workers."""
    result = subprocess.run([sys.executable, "-c", LEAVES_WITH_3], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout == "written before leaving"
    assert result.stderr == "error line"


def test_ranks_come_from_torchruns_variables(monkeypatch):
    from cpt.common import runtime

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (runtime.rank(), runtime.world_size(), runtime.local_rank(), runtime.is_main_process()) == (3, 4, 1, False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert (runtime.rank(), runtime.world_size(), runtime.local_rank(), runtime.is_main_process()) == (0, 1, 0, True)
