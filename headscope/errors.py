"""The one exception type the CLI turns into a single clear line and a non-zero exit."""

import contextlib
import sys
import unicodedata


class HeadscopeError(Exception):
    """Bad input or an impossible request. The message is one line a user can act on."""


_QUIET = []  # non-empty while quiet_notes() runs


def notify(message: str) -> None:
    """One line on stderr about something the user should know but that is not an error."""
    if not _QUIET:
        print(f"headscope: note: {printable(message)}", file=sys.stderr)


def printable(text: str, keep: str = "") -> str:
    """`text` with every control or format character but those in `keep` shown as its escape (\\x1b, \\u202e): a
    data file, a sample id or a model folder's name cannot move the cursor, clear the screen, set the terminal's
    title, reorder the line (bidi overrides) or add a line to a message that is one line."""
    return "".join(char if char in keep or not _hidden(char) else char.encode("unicode_escape").decode("ascii")
                   for char in text)


def _hidden(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")


class EscapedStream:
    """A text stream that writes through `printable` (keeping newlines and tabs): what the commands print on
    standard output (tables, `wrote PATH` lines) carries no raw control character from a name or a file."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(printable(text, keep="\n\t"))

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def quiet_notes():
    """No notes while work the user did not ask for runs (`check` builds each task's first prompts with the task's
    default grid: a note on that grid's --max-length would name a flag `check` does not have)."""
    _QUIET.append(True)
    try:
        yield
    finally:
        _QUIET.pop()


def loading_reason(error: Exception) -> str:
    """Why transformers could not load something, in one line; its advice to pass trust_remote_code=True is said
    as headscope's flag (a model named by a file is never trusted without it)."""
    if "trust_remote_code" in str(error):
        return "it needs custom code (its config has an auto_map), which headscope runs only with --trust-remote-code"
    return first_sentence(str(error)) or type(error).__name__


def first_sentence(text: str) -> str:
    """A message's lines joined up to the end of its first sentence: one line, never cut mid-sentence
    ("... from one of:" is followed by the list it announces)."""
    taken = []
    for line in text.strip().splitlines():
        taken.append(line.strip())
        if line.rstrip().endswith((".", "!", "?")):
            break
    return " ".join(part for part in taken if part)
