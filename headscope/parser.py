"""argparse, with headscope's one line per mistake: `headscope: error: SUBCOMMAND: what is wrong (see `headscope
SUBCOMMAND --help`)` instead of the whole usage, and a mistyped flag answered by the subcommand that was typed, with
the flag it most resembles ("did you mean").

Python 3.14's argparse suggests on its own (suggest_on_error); headscope supports 3.10, so difflib does it here."""
from __future__ import annotations

import argparse
import difflib


class HeadscopeParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the subcommand (its subparsers are of this class too:
    argparse makes them with the class of the parser they belong to)."""

    def error(self, message: str):
        self.exit(2, one_line(self.prog, message) + "\n")


def one_line(prog: str, message: str) -> str:
    """`headscope: error: detect retrieval: MESSAGE (see `headscope detect retrieval --help`)`."""
    command = prog.removeprefix("headscope").strip()
    where = f"{command}: " if command else ""
    return f"headscope: error: {where}{' '.join(message.split())} (see `{prog} --help`)"


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The subcommand's parser that parsed the command line (`headscope detect retrieval` -> detect retrieval's),
    following the subcommands the namespace names."""
    while True:
        subcommands = next((action for action in parser._actions if isinstance(action, argparse._SubParsersAction)),
                           None)
        chosen = getattr(args, subcommands.dest, None) if subcommands else None
        if chosen not in getattr(subcommands, "choices", {}):
            return parser
        parser = subcommands.choices[chosen]


def unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> None:
    """Words of the command line that no argument took: one line from the subcommand's parser, each mistyped flag
    with the subcommand's flag it most resembles."""
    chosen = chosen_parser(parser, args)
    flags = [flag for action in chosen._actions for flag in action.option_strings if flag.startswith("--")]
    guesses = {}  # typed flag -> the subcommand's flag it most resembles
    for word in rest:
        typed = word.split("=", 1)[0]
        close = difflib.get_close_matches(typed, flags, n=1, cutoff=0.6) if typed.startswith("-") else []
        if close:
            guesses[typed] = close[0]
    hint = "; ".join(f"{typed}: did you mean {flag}?" for typed, flag in guesses.items())
    if len(guesses) == 1:
        hint = f"did you mean {next(iter(guesses.values()))}?"
    chosen.error(f"unrecognized arguments: {' '.join(rest)}" + (f": {hint}" if hint else ""))
