"""The benchmarks' smaller machine (benchmarks/small_machine.py): a child over its memory cgroup's limit is
killed and reported, one under it runs. Skipped where no memory cgroup is writable (not root, no cgroupfs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from small_machine import Limited  # noqa: E402

MB = 2**20


def limited_or_skip(limit: int) -> Limited:
    try:
        return Limited(limit)
    except SystemExit as e:
        pytest.skip(str(e))


def allocate(box: Limited, mb: int) -> subprocess.CompletedProcess:
    """A child that touches `mb` MiB of anonymous memory (every page written) under `box`."""
    code = f"b = bytearray({mb} * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=box.enter)


def test_a_child_over_the_limit_is_killed_and_one_under_it_runs():
    with limited_or_skip(256 * MB) as box:
        over = allocate(box, 512)
        report = box.report()
    assert over.returncode == -9 and "ok" not in over.stdout
    assert report["oom_kills"] == 1 and report["limit_mb"] == 256
    assert report["peak_mb"] is None or report["peak_mb"] <= 256

    with limited_or_skip(256 * MB) as box:
        under = allocate(box, 64)
        report = box.report()
    assert under.returncode == 0 and under.stdout.strip() == "ok"
    assert report["oom_kills"] == 0
    assert report["peak_mb"] is None or 64 <= report["peak_mb"] <= 256
    assert not box.path.exists()  # removed on exit
