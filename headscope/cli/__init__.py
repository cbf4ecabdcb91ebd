"""cli: the `headscope` command.

`commands` (the parser and every command but the views), `analysis_commands` (show, compare, export) and `report`
(the HTML page of a run folder).

May import: everything but `families`."""
from .commands import main

__all__ = ["main"]
