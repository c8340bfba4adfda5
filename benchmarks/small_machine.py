"""A smaller machine inside this one: a child process under a Linux memory cgroup's hard limit (no swap), so a
run that needs more memory than the limit is killed by the kernel's OOM killer as it would be on a machine with
that much memory. Needs root and the cgroup file system (v1's memory controller or v2 with `memory` enabled).

    with Limited(2 * 2**30) as box:
        proc = subprocess.run(cmd, preexec_fn=box.enter)
        box.report()  # {"limit_mb", "peak_mb" (resident + page cache charged to it), "oom_kills"}
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

V1, V2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
MB = 2**20


def own_group(root: Path, v2: bool) -> Path:
    """This process's own memory cgroup (from /proc/self/cgroup), so the box nests inside whatever limits the
    container already sets; the hierarchy's root where that cannot be read."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (v2 and controllers == "") or (not v2 and "memory" in controllers.split(",")):
                group = root / path.lstrip("/")
                return group if group.is_dir() else root
    except OSError:
        pass
    return root


class Limited:
    def __init__(self, limit: int):
        self.limit = limit
        self.v2 = (V2 / "cgroup.controllers").is_file() and "memory" in (V2 / "cgroup.controllers").read_text()
        root = V2 if self.v2 else V1
        parent = own_group(root, self.v2)
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise SystemExit(f"--memory-limit needs a writable memory cgroup ({parent}): run as root on Linux "
                             "with cgroups mounted, or leave --memory-limit out")
        self.path = parent / f"abliterate-bench-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Limited:
        self.path.mkdir()
        if self.v2:
            (self.path / "memory.max").write_text(str(self.limit))
            (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
            sw = self.path / "memory.memsw.limit_in_bytes"  # present when swap accounting is on
            if sw.exists():
                sw.write_text(str(self.limit))
        return self

    def enter(self) -> None:
        """preexec_fn: move the child (before it runs anything) into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def report(self) -> dict:
        if self.v2:
            peak = self.path / "memory.peak"
            events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
            kills = int(events.get("oom_kill", 0))
            peak_b = int(peak.read_text()) if peak.exists() else None
        else:
            control = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
            kills = int(control.get("oom_kill", 0))
            peak_b = int((self.path / "memory.max_usage_in_bytes").read_text())
        return {"limit_mb": round(self.limit / MB), "peak_mb": None if peak_b is None else round(peak_b / MB, 1),
                "oom_kills": kills, "cgroup": "v2" if self.v2 else "v1"}

    def __exit__(self, *exc) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass
