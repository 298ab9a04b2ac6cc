"""argparse parsers that keep what was declared on them.

The man pages and the bash completion are generated from the parsers (``ctl/docs.py``), and
argparse has no public way to list a parser's arguments or commands: these parsers record
them as they are declared, so nothing reads argparse's private attributes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Protocol, Self


class DocumentedParser(argparse.ArgumentParser):
    """An ArgumentParser whose arguments (``declared``, in order, ``-h`` included) and
    commands (``commands``: name -> (parser, help)) can be listed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.declared: list[argparse.Action] = []
        self.commands: dict[str, tuple[Self, str]] = {}
        self.on_command: Callable[[Self], None] | None = None
        self._commands: Any = None  # argparse's subparsers action (its type is private)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.declared.append(action)
        return action

    def exclusive(self, required: bool = False) -> Exclusive:
        """A mutually exclusive group whose arguments are recorded here too."""
        return Exclusive(self, self.add_mutually_exclusive_group(required=required))

    def subcommands(self, **kwargs: Any) -> None:
        """Take commands (``add_subparsers``' arguments); each is added by :meth:`command`."""
        self._commands = self.add_subparsers(parser_class=type(self), **kwargs)

    def command(self, name: str, help: str, **kwargs: Any) -> Self:
        """A command's parser; ``on_command`` (if set) adds what every command takes."""
        if self._commands is None:
            raise RuntimeError("subcommands() first")
        sp: Self = self._commands.add_parser(name, help=help, **kwargs)
        self.commands[name] = (sp, help)
        if self.on_command is not None:
            self.on_command(sp)
        return sp

    def options(self) -> list[argparse.Action]:
        """The options a user sees (``-h`` included; hidden ones not)."""
        return [a for a in self.declared if a.option_strings and a.help != argparse.SUPPRESS]

    def positionals(self) -> list[argparse.Action]:
        return [a for a in self.declared if not a.option_strings]


class _Group(Protocol):
    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action: ...


class Exclusive:
    """A mutually exclusive group of a :class:`DocumentedParser`."""

    def __init__(self, parser: DocumentedParser, group: _Group) -> None:
        self._parser = parser
        self._group = group

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = self._group.add_argument(*args, **kwargs)
        self._parser.declared.append(action)
        return action
