"""Generated files, whatever generates them: write them, or show how the checked-in copies
drifted (the generators' ``--check`` and their drift tests)."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

Files = Mapping[str, str]  # path relative to the repository root -> text


def default_root() -> Path:
    """The repository root when run from a checkout, else the current directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def drift(files: Files, root: Path) -> list[str]:
    """Differences between ``files`` and those under ``root`` (empty: none)."""
    problems: list[str] = []
    for rel, text in sorted(files.items()):
        path = root / rel
        current = path.read_text() if path.is_file() else None
        if current is None:
            problems.append(f"{rel}: missing")
        elif current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True),
                f"{rel} (checked in)", f"{rel} (generated)", n=1)
            problems.append("".join(list(diff)[:40]))
    return problems


def write(files: Files, root: Path) -> list[str]:
    """Write ``files`` under ``root``; return the relative paths changed."""
    changed = []
    for rel, text in sorted(files.items()):
        path = root / rel
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(rel)
    return changed


def main(argv: Sequence[str] | None, *, command: str, description: str, what: str,
         check: Callable[[Path], list[str]], generate: Callable[[Path], list[str]]) -> int:
    """``command [--check] [--root DIR]``: ``check`` returns the drift, ``generate`` writes
    and returns what it changed; ``what`` names the files in messages ("CRDs")."""
    parser = argparse.ArgumentParser(prog=command, description=description)
    parser.add_argument("--check", action="store_true", help="fail when files are stale")
    parser.add_argument("--root", type=Path, default=None, help="repository root")
    args = parser.parse_args(argv)
    root: Path = args.root or default_root()
    if args.check:
        problems = check(root)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print(f"{what} are stale: run `{command}`", file=sys.stderr)
            return 1
        print(f"{what} up to date")
        return 0
    for rel in generate(root):
        print(f"wrote {rel}")
    return 0
