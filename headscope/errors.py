"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class HeadscopeError(Exception):
    """Bad input or an impossible request. The message is one line a user can act on."""
