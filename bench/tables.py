"""What the small benchmarks (texture.py, batch.py) share: the machine's name, the commit, and rows
appended to a table of their own section in BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commit() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine(device: str) -> str:
    """The GPU's name, or the CPU's model and the cores this process may use."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def add_rows(path: Path, section: str, intro: str, header: str, rows: list[list[str]]) -> None:
    """Appends ``rows`` (cells) to the table under the heading ``section`` of ``path``; a missing
    section is added at the end with ``intro`` and the table ``header`` (its two header lines)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{intro}\n\n{header}"
    lines = text.splitlines(keepends=True)
    end = lines.index(header.splitlines(keepends=True)[0], lines.index(section + "\n"))
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    for cells in rows:
        lines.insert(end, "| " + " | ".join(cells) + " |\n")
        end += 1
    path.write_text("".join(lines))
