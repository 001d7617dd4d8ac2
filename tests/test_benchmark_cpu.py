"""benchmarks/cpu.py runs: a smoke test of its quick mode (tiny sizes, one thread, no compile)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_times_and_checks_every_peer():
    """Every peer gets a row per case (the peers of a case are warmed up, checked against
    ``blocked`` and timed in turns), and the targets are printed."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cpu.py"), "--quick", "--threads", "1",
           "--windows", "8,8", "--peers", "loop,sdpa_dense,chunked,blocked"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    row = re.compile(r"^\s+(\S+)\s+(forward|train)\s+window=\([^)]*\)\s+n=\s*(\d+) .* ms ")
    got = {(m[1], m[2], int(m[3])) for m in map(row.match, out.stdout.splitlines()) if m}  # (peer, direction, n)
    forward = {(p, "forward", n) for n in (128, 1024) for p in ("sdpa_dense", "chunked", "blocked")}
    train = {(p, "train", 1024) for p in ("sdpa_dense", "chunked", "blocked")}
    assert forward | train | {("loop", "forward", 128)} <= got, sorted(got)
    assert "cannot run" not in out.stdout and "Targets:" in out.stdout
