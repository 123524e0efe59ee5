"""What travels to the GPU machine, measured against its limit.

The device tool copies the checkout's tracked files, its untracked files that git does not
ignore, and the ignored folders a call names in ``carry``; all of it together may be at most
64 MiB, or the call is refused. The campaign's call carries the data pack (``.pack``) and the
wheels (``.whl``); a resume on a fresh machine also carries the earlier run's checkpoints
(``.campaign``). :data:`BUDGET_MIB` keeps 2 MiB below the limit for files that appear in the
checkout between the prepare step and the call (notes, logs): a refused call costs nothing, but
a session that has to rebuild its pack in a hurry costs a lease.

``python -m training.gpu.travel --carry .whl .pack`` prints the sizes and fails over budget;
``room`` prints what is left for the photos (what ``scripts/gpu_prepare.sh`` builds to).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

MIB = 2**20
LIMIT_MIB = 64
BUDGET_MIB = 62
"""What the campaign's call may carry in all (module docstring: why not 64)."""
MIN_PHOTO_MIB = 4.0
"""The smallest photo pack worth a lease (~200 photos at 288 px); below it, prepare refuses."""


def _git(repo: Path, *args: str) -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, check=True
    ).stdout.decode()
    return [name for name in out.split("\0") if name]


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size  # a link travels as a link
    except FileNotFoundError:  # tracked but deleted in the checkout: nothing travels
        return 0


def tree_bytes(repo: Path) -> tuple[int, int]:
    """Bytes of the tracked files and of the untracked, not ignored ones (as they travel)."""
    tracked = sum(_size(repo / name) for name in _git(repo, "ls-files", "-z"))
    others = _git(repo, "ls-files", "-z", "--others", "--exclude-standard")
    return tracked, sum(_size(repo / name) for name in others)


def folder_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (0 if it is not there)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        total += sum(_size(Path(root) / name) for name in files)
    return total


@dataclass(frozen=True)
class Travel:
    """One call's travelling bytes, part by part."""

    tracked: int
    untracked: int
    carried: dict[str, int]

    @property
    def total(self) -> int:
        return self.tracked + self.untracked + sum(self.carried.values())

    def lines(self) -> list[str]:
        rows = [("tracked files", self.tracked), ("untracked, not ignored", self.untracked)]
        rows += [(f"carried {name}", size) for name, size in self.carried.items()]
        rows.append(("total", self.total))
        return [f"{label:<28} {size / MIB:8.2f} MiB" for label, size in rows] + [
            f"{'budget (limit 64 MiB)':<28} {BUDGET_MIB:8.2f} MiB"
        ]


def measure(repo: Path, carry: Iterable[str]) -> Travel:
    tracked, untracked = tree_bytes(repo)
    return Travel(tracked, untracked, {name: folder_bytes(repo / name) for name in carry})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.gpu.travel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", default="check", choices=["check", "room"])
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--carry", nargs="*", default=[".whl", ".pack"])
    parser.add_argument(
        "--reserve-mib",
        type=float,
        default=0.0,
        help="room: also keep this much free (files not built yet)",
    )
    args = parser.parse_args(argv)
    travel = measure(args.repo, args.carry)
    if args.command == "room":
        room = BUDGET_MIB - travel.total / MIB - args.reserve_mib
        print(f"{room:.2f}")
        return 0 if room >= MIN_PHOTO_MIB else 1
    print("\n".join(travel.lines()))
    if travel.total > BUDGET_MIB * MIB:
        print(f"over budget by {(travel.total - BUDGET_MIB * MIB) / MIB:.2f} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
