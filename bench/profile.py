"""py-spy around a benchmark run: sample every process of a stack, then summarise.

``Profiler.start(pids)`` runs one ``py-spy record --format raw`` per process (folded
stacks); ``stop()`` ends them and ``summary()`` prints, per process, the functions with the
most samples on top of the stack (own time) and overall (inclusive).
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
from pathlib import Path


class Profiler:
    def __init__(self, folder: Path, rate: int = 200):
        self.folder = folder
        self.rate = rate
        self.procs: dict[str, subprocess.Popen] = {}
        folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def available() -> bool:
        return shutil.which("py-spy") is not None

    def start(self, pids: dict[str, int]) -> None:
        for name, pid in pids.items():
            out = self.folder / f"{name}.folded"
            self.procs[name] = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "--rate",
                    str(self.rate),
                    "--nonblocking",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def summary(self, top: int = 12) -> str:
        lines = []
        for path in sorted(self.folder.glob("*.folded")):
            own: collections.Counter[str] = collections.Counter()
            inclusive: collections.Counter[str] = collections.Counter()
            total = 0
            for row in path.read_text().splitlines():
                stack, _, count = row.rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                frames = [
                    f.split(" (")[0]
                    + " ("
                    + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                    + ")"
                    if " (" in f
                    else f
                    for f in stack.split(";")
                ]
                total += n
                own[frames[-1]] += n
                for frame in set(frames):
                    inclusive[frame] += n
            if not total:
                continue
            lines.append(f"--- {path.stem}: {total} samples")
            lines.append("  own time:")
            lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
            lines.append("  inclusive:")
            lines += [
                f"    {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top + 8)
            ]
        return "\n".join(lines)
