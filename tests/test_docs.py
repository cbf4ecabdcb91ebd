"""The README and the guides in docs/ stay true.

- Every relative link resolves: the file exists and, for `FILE.md#anchor`, FILE has a heading whose GitHub anchor
  is `anchor` (GitHub's slug rule: lower case, every character but letters, digits, `_`, `-` and spaces dropped,
  spaces to `-`; a repeated heading gets `-1`, `-2`, ...).
- Every fence names its language, and every ```bash block carries a marker on the line before it:
  `<!-- cheap -->` (run here, from a fresh temporary folder, with `headscope` meaning `python -m headscope` of this
  checkout; it must exit 0) or `<!-- not run: WHY -->`. So a new command cannot go unmarked, and a cheap one that
  breaks fails the suite.
- The README's table of commands lists exactly the subcommands of `headscope --help`.
"""
import argparse
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHEAP = "<!-- cheap -->"
NOT_RUN = re.compile(r"<!-- not run: \S.* -->")
COMMAND_LANGUAGES = {"bash", "sh", "shell", "console"}
BLOCK_TIMEOUT_S = 300  # far above what a cheap block costs (about 10-25 s on 2 busy cores): a hang, not a budget
FENCE = re.compile(r"^ *```(.*)$")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    marker: str  # the line before the fence, stripped
    body: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found, start = [], None
    for index, line in enumerate(lines):
        match = FENCE.match(line)
        if not match:
            continue
        if start is None:
            start = index
        else:
            marker = lines[start - 1].strip() if start else ""
            found.append(Block(path, start + 1, FENCE.match(lines[start]).group(1).strip(), marker,
                               "\n".join(lines[start + 1:index]) + "\n"))
            start = None
    assert start is None, f"{path.relative_to(ROOT)}:{start + 1}: a fence that never closes"
    return found


def prose(text: str) -> str:
    """The text outside fenced blocks, inline code stripped of `[]()#` (there they are no link or heading; a slug
    drops them anyway)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            kept.append(re.sub(r"`[^`]*`", lambda code: re.sub(r"[\[\]()#]", "", code.group(0)), line))
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(path.read_text()), re.MULTILINE):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(path: Path) -> list[str]:
    """Each relative link of `path` whose file or anchor does not exist, as 'target: why'."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)(?: \"[^\"]*\")?\)", prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked here (no network)
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: {linked.name} has no heading with that anchor")
    return broken


def run_block(block: Block, folder: Path) -> subprocess.CompletedProcess:
    """A cheap block, as a user pasting it into a shell in an empty folder would run it (bash -e: the first failing
    line fails the block), with `headscope` this checkout's `python -m headscope`."""
    bin_dir = folder / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "headscope"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m headscope "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(["bash", "-e", "-c", block.body], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)


ALL_BLOCKS = [block for path in DOCS for block in blocks(path)]
CHEAP_BLOCKS = [block for block in ALL_BLOCKS if block.marker == CHEAP]


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_every_fence_names_its_language_and_every_command_block_is_marked():
    unnamed = [block.name for block in ALL_BLOCKS if not block.language]
    unmarked = [block.name for block in ALL_BLOCKS if block.language in COMMAND_LANGUAGES
                and block.marker != CHEAP and not NOT_RUN.fullmatch(block.marker)]
    assert unnamed == [], "fences with no language (```text for output)"
    assert unmarked == [], f"command blocks with neither {CHEAP} nor <!-- not run: WHY --> on the line before"
    assert CHEAP_BLOCKS, "no cheap block: the docs' commands would go untested"


@pytest.mark.docs
@pytest.mark.parametrize("block", CHEAP_BLOCKS, ids=lambda block: block.name)
def test_a_cheap_block_runs(block, tmp_path):
    done = run_block(block, tmp_path)
    assert done.returncode == 0, f"{block.name} exited {done.returncode}:\n{block.body}\n{done.stderr[-3000:]}"


def test_the_readme_lists_every_command():
    from headscope.cli.commands import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    listed = re.findall(r"^\| `headscope (\w+)", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert sorted(listed) == sorted(commands.choices)


# ---------------------------------------------------------------------------- the checks themselves fail

def test_a_broken_link_or_anchor_is_found(tmp_path):
    heading = "## Run folders: `--out` (and more)\n\n"
    (tmp_path / "guide.md").write_text(f"# A guide\n\n{heading}{heading}")  # anchors ...-and-more, ...-and-more-1
    page = tmp_path / "page.md"
    page.write_text("[ok](guide.md#run-folders---out-and-more-1) [ok](#page) [web](https://example.org/x#y)\n"
                    "`[code](missing.md)`\n```text\n[fenced](missing.md)\n```\n"
                    "[gone](missing.md) [no anchor](guide.md#run-folders) "
                    "[twice](guide.md#run-folders---out-and-more-2)\n"
                    "# Page\n")
    assert broken_links(page) == ["missing.md: no such file",
                                  "guide.md#run-folders: guide.md has no heading with that anchor",
                                  "guide.md#run-folders---out-and-more-2: guide.md has no heading with that anchor"]


def test_a_failing_line_fails_its_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"{CHEAP}\n```bash\nheadscope show missing_heads.json\necho reached\n```\n")
    block = blocks(page)[0]
    done = run_block(block, tmp_path)
    assert done.returncode == 2 and "headscope: error:" in done.stderr and "reached" not in done.stdout
