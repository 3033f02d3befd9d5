"""Every benchmark runs as ``benchmarks/README.md`` documents it, from the repository root, with
tiny sizes appended to the documented command (the full runs take minutes; their figures are not
checked here, only that each run ends with its JSON line); and each also runs as a path,
``python benchmarks/<name>.py``, from any directory. ``benchmarks.compare`` runs its arqd rows
only: the peers' installs (apt, a second venv) stay out of the suite."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "benchmarks" / "README.md"
# Appended to each documented command; argparse lets the last value of an option win.
TINY = {
    "throughput": "--jobs 200 --rtt 20",
    "compare": "--only arqd --workloads noop,sleep,rtt --jobs 100 --rtt 10",
    "scale": "--sizes 100,200 --sample 50 --rounds 1 --rtt 10 --longpolls 10 --seconds 1",
    "http_api": "--seconds 1 --batches 1",
    "dynamodb_cost": "--jobs 10 --rate 50 --idle 0.5 --shards 2",
    "server_scale": "--daemons 1,2 --jobs 300 --depths 100,300 --sample 200 --rounds 1",
}
COMMAND = re.compile(r"^\.venv/bin/python -m benchmarks\.(\w+)(.*)$", re.MULTILINE)


def documented() -> dict[str, list[str]]:
    """Each benchmark's documented command line: module name → its arguments."""
    return {m[1]: shlex.split(m[2]) for m in COMMAND.finditer(README.read_text())}


def scripts() -> set[str]:
    """The benchmarks: modules of benchmarks/ that run as a program."""
    return {
        path.stem
        for path in (ROOT / "benchmarks").glob("*.py")
        if '__name__ == "__main__"' in path.read_text()
    }


def test_every_benchmark_is_documented_and_smoke_tested():
    """benchmarks/README.md gives a command for every benchmark, and this suite runs each."""
    assert set(documented()) == scripts() == set(TINY)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", sorted(TINY))
def test_documented_command_runs(name: str):
    """The documented command, with tiny sizes, runs from the root and ends with its JSON line."""
    argv = [sys.executable, "-m", f"benchmarks.{name}", *documented()[name], *TINY[name].split()]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, f"{shlex.join(argv)}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(figures, dict) and figures


@pytest.mark.parametrize("name", sorted(TINY))
def test_runs_as_a_path_from_anywhere(name: str, tmp_path: Path):
    """``python benchmarks/<name>.py`` imports (no module of benchmarks/ shadows a library one,
    and ``benchmarks`` is found) from any working directory, with no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    argv = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout
