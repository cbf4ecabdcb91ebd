"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


import sys


class HeadscopeError(Exception):
    """Bad input or an impossible request. The message is one line a user can act on."""


def notify(message: str) -> None:
    """One line on stderr about something the user should know but that is not an error."""
    print(f"headscope: note: {message}", file=sys.stderr)
