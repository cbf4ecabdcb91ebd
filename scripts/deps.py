"""The locked install: constraints.txt is the exact set of every dependency the README's commands install and CI
tests; pyproject.toml keeps the ranges a library user installs into their own environment.

    python scripts/deps.py check             # this environment holds exactly the locked set (CI runs this)
    python scripts/deps.py write             # constraints.txt from this environment (after the suite passed on it)
    python scripts/deps.py newest            # a fresh venv with the newest releases inside pyproject's ranges:
                                             # what moved against the lock, and what of the suite breaks
    python scripts/deps.py newest --write    # the same, and if the suite passes, constraints.txt from that venv

torch is not in the lock: the README's commands install `torch==2.13.0` (a CPU build) first, and a GPU machine
installs the build it needs. Upgrading is a decision: see docs/development.md, *Upgrading dependencies*.
Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
NOT_LOCKED = {"headscope", "torch", "pip", "setuptools", "wheel"}  # the project itself, and what installs it
HEADER = """\
# The exact, tested set the README's two commands and CI install (pip install -c constraints.txt ...), for
# CPython 3.11 on Linux x86-64. torch is installed first, on its own (torch==2.13.0 here).
# Written by scripts/deps.py from an environment the whole suite passed on; do not edit by hand.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(text: str) -> dict[str, str]:
    """{canonical name: version} of `name==version` lines (comments, editable and local installs skipped)."""
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        if match:
            pins[canonical(match[1])] = match[2].split("+")[0]  # 2.13.0+cpu is torch 2.13.0
    return pins


def installed(python: str) -> dict[str, str]:
    frozen = subprocess.run([python, "-m", "pip", "freeze", "--all"], check=True, capture_output=True, text=True)
    return {name: version for name, version in parse(frozen.stdout).items() if name not in NOT_LOCKED}


def differences(locked: dict[str, str], found: dict[str, str]) -> list[str]:
    """One line per package whose installed version is not the locked one (or that only one side has)."""
    lines = []
    for name in sorted(set(locked) | set(found)):
        if locked.get(name) != found.get(name):
            lines.append(f"{name}: locked {locked.get(name, '-')}, installed {found.get(name, '-')}")
    return lines


def check(python: str) -> int:
    drift = differences(parse(LOCK.read_text()), installed(python))
    for line in drift:
        print(f"deps: {line}")
    print("deps: the environment is the locked set" if not drift else
          f"deps: {len(drift)} package(s) differ from {LOCK.name}")
    return 1 if drift else 0


def newest(write: bool, torch: str) -> int:
    """A fresh venv with the newest releases pyproject.toml allows; the suite run on it, and its report."""
    with tempfile.TemporaryDirectory(prefix="headscope-newest-") as folder:
        python = str(Path(folder) / "bin" / "python")
        run = lambda *command: subprocess.run(command, cwd=ROOT, check=True)  # noqa: E731
        run(sys.executable, "-m", "venv", folder)
        run(python, "-m", "pip", "install", "-q", f"torch=={torch}")
        run(python, "-m", "pip", "install", "-q", "--upgrade-strategy", "eager", "-e", ".[test,metrics]")
        found = installed(python)
        moved = differences(parse(LOCK.read_text()), found)
        print("\n".join(f"deps: {line}" for line in moved) or "deps: the newest releases are the locked ones")
        tests = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=line"], cwd=ROOT)
        if tests.returncode != 0:
            print(f"deps: the suite fails on the newest releases (exit {tests.returncode}): the lock stays as it is")
            return tests.returncode
        if write:
            write_lock(found)
    return 0


def write_lock(found: dict[str, str]) -> None:
    LOCK.write_text(HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(found.items())))
    print(f"deps: wrote {LOCK} ({len(found)} packages); run the family sweep on it before committing (docs/development.md, "
          "*Upgrading dependencies*)")


def main() -> int:
    parser = argparse.ArgumentParser(description="The locked install: check it, or try the newest releases.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="this Python's environment holds exactly constraints.txt")
    commands.add_parser("write", help="constraints.txt from this Python's environment")
    trying = commands.add_parser("newest", help="the suite on the newest releases inside pyproject's ranges")
    trying.add_argument("--write", action="store_true", help="rewrite constraints.txt if the suite passes")
    trying.add_argument("--torch", default="2.13.0", help="the torch release installed first (default 2.13.0)")
    args = parser.parse_args()
    if args.command == "write":
        write_lock(installed(sys.executable))
        return 0
    return check(sys.executable) if args.command == "check" else newest(args.write, args.torch)


if __name__ == "__main__":
    sys.exit(main())
