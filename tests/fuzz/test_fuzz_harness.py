"""Runs the atheris harness (tests/fuzz/fuzz_frames.py) for a bounded number of inputs, so CI
exercises it: libFuzzer exits non-zero on any exception other than FrameError, a segfault in
the compiled twin, or the twins disagreeing. Needs ``atheris`` (test extra) and the compiled twin."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.twins import NO_EXTENSIONS_VAR, load_twin

ROOT = Path(__file__).resolve().parents[2]
RUNS = 20_000


def test_atheris_harness_runs_clean(tmp_path) -> None:
    if os.environ.get(NO_EXTENSIONS_VAR):
        pytest.skip(f'{NO_EXTENSIONS_VAR} is set: the harness compares against the compiled twin')
    load_twin('compiled', 'frames')  # a missing build fails here, loudly, with how to build it
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.fail('atheris is not installed: `pip install atheris` (it is in the test extra)', pytrace=False)
    proc = subprocess.run(
        [sys.executable, '-m', 'tests.fuzz.fuzz_frames', f'-runs={RUNS}', '-seed=1',
         f'-artifact_prefix={tmp_path}/'],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    crashes = list(tmp_path.glob('crash-*')) + list(tmp_path.glob('timeout-*'))
    assert proc.returncode == 0 and not crashes, (
        f'the fuzz harness failed (exit {proc.returncode}, artifacts {crashes}):\n{proc.stderr[-4000:]}')
    assert f'Done {RUNS} runs' in proc.stderr
