"""docs/commands.md, generated from the ``vggnorm`` argument parser.

    python scripts/commands_doc.py            # rewrite docs/commands.md
    python scripts/commands_doc.py --check    # exit 1 if docs/commands.md differs from the parser

The page is built from :func:`vggnorm.cli.build_parser`, the parser ``vggnorm <command> --help``
prints, so it cannot drift from the program: ``tests/test_docs.py`` fails when the file and
:func:`render` differ. The output depends on nothing but the parser: no terminal width, no Python
version's help layout, and not the machine's core count (the ``--workers`` default is the cores
of the machine that runs the command, so the page names it in words).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "commands.md"


class _Cores(int):
    """Stands in for the machine's core count while the parser is built."""

    TEXT = "as `nproc` counts them on the machine that runs it"

    def __format__(self, spec: str) -> str:
        return self.TEXT

    def __str__(self) -> str:
        return self.TEXT

    __repr__ = __str__


@contextlib.contextmanager
def _machine_independent(cli: Any) -> Iterator[None]:
    """Build the parser with the default thread count named in words, not as this machine's."""
    original = getattr(cli, "_default_workers", None)
    if original is None:
        yield
        return
    cli._default_workers = lambda: _Cores(1)
    try:
        yield
    finally:
        cli._default_workers = original


def _parser() -> argparse.ArgumentParser:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from vggnorm import cli

    with _machine_independent(cli):
        return cli.build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every command, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), p) for name, p in action.choices.items()]
    raise SystemExit("the vggnorm parser has no commands")


def _text(s: str) -> str:
    """Help text as one Markdown line (safe inside a table cell)."""
    s = " ".join(s.split())
    return s.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def _help(action: argparse.Action, prog: str) -> str:
    """The help string with argparse's ``%(...)s`` fields expanded, as ``--help`` shows it."""
    params: dict[str, Any] = dict(vars(action), prog=prog)
    for name in list(params):
        if params[name] is argparse.SUPPRESS:
            del params[name]
        elif hasattr(params[name], "__name__"):
            params[name] = params[name].__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return _text(str(action.help) % params)


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest if not action.option_strings else action.dest.upper()


def _args(action: argparse.Action) -> str:
    """What follows the option on the command line, as argparse writes it."""
    if action.nargs == 0:
        return ""
    m = _metavar(action)
    forms = {None: m, "?": f"[{m}]", "*": f"[{m} ...]", "+": f"{m} [{m} ...]"}
    if isinstance(action.nargs, int):
        return " ".join([m] * action.nargs)
    return forms.get(action.nargs, m)


def _invocation(action: argparse.Action) -> str:
    args = _args(action)
    if not action.option_strings:
        return args
    return ", ".join(action.option_strings) + (f" {args}" if args else "")


def _key(action: argparse.Action) -> tuple[str, ...]:
    return tuple(action.option_strings) or (action.dest,)


def _shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a for a in parser._actions
        if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
    ]  # fmt: skip


def _shared(commands: Sequence[tuple[str, str, argparse.ArgumentParser]]) -> list[argparse.Action]:
    """Options every command takes with the same help (documented once)."""
    first = commands[0][2]
    out = []
    for action in _shown(first):
        if not action.option_strings:
            continue
        same = True
        for _, _, p in commands[1:]:
            match = [a for a in _shown(p) if _key(a) == _key(action)]
            if not match or _help(match[0], p.prog) != _help(action, first.prog):
                same = False
        if same:
            out.append(action)
    return out


def _table(rows: Sequence[tuple[str, str]], what: str = "option") -> list[str]:
    lines = [f"| {what} | meaning |", "|---|---|"]
    lines += [f"| `{opt}` | {meaning} |" for opt, meaning in rows]
    return lines


def _synopsis(name: str, parser: argparse.ArgumentParser) -> str:
    words = [f"vggnorm {name}"]
    optional = False
    for action in _shown(parser):
        if not action.option_strings:
            words.append(_args(action))
        elif action.required:
            words.append(_invocation(action).split(", ")[-1])
        else:
            optional = True
    return " ".join(words + (["[options]"] if optional else []))


def _command(
    name: str, summary: str, parser: argparse.ArgumentParser, shared: set[tuple[str, ...]]
) -> list[str]:
    first = _text(summary)
    lines = [f"## `vggnorm {name}`", "", f"{first[:1].upper()}{first[1:]}.", ""]
    if parser.description:
        lines += [_text(parser.description), ""]
    lines += ["```", _synopsis(name, parser), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a in _shown(parser) and _key(a) not in shared]
        if not actions:
            continue
        positional = all(not a.option_strings for a in actions)
        title = group.title or ""
        if title in ("options", "optional arguments"):
            title = "Options"
        elif title == "positional arguments" or positional:
            title = "Arguments"
        else:
            title = title[:1].upper() + title[1:]
        rows = [
            (_invocation(a), ("(required) " if a.required and a.option_strings else "")
             + _help(a, parser.prog))
            for a in actions
        ]  # fmt: skip
        table = _table(rows, "argument" if positional else "option")
        lines += [f"**{title}**", "", *table, ""]
    lines += ["and the [options every command takes](#options-every-command-takes).", ""]
    return lines


def render() -> str:
    """docs/commands.md as the parser describes the commands today."""
    parser = _parser()
    commands = _subcommands(parser)
    shared_actions = _shared(commands)
    shared = {_key(a) for a in shared_actions}
    lines = [
        "# Commands",
        "",
        "<!-- Generated by scripts/commands_doc.py from the vggnorm argument parser; do not edit."
        " Regenerate with: python scripts/commands_doc.py -->",
        "",
        "This page is generated from the parser that `vggnorm --help` and "
        "`vggnorm COMMAND --help` print (`scripts/commands_doc.py`), and a test "
        "(`tests/test_docs.py`) fails when the two differ. What the commands do, with examples: "
        "the [README](../README.md); the files they read and write: [formats](formats.md) and "
        "[files](files.md).",
        "",
    ]
    if parser.description:
        lines += [_text(parser.description), ""]
    lines += ["```", "vggnorm COMMAND [options]", "vggnorm --version", "```", ""]
    lines += ["| command | what it does |", "|---|---|"]
    lines += [f"| [`{n}`](#vggnorm-{n}) | {_text(h)} |" for n, h, _ in commands]
    lines += [""]
    if parser.epilog:
        lines += [_text(parser.epilog), ""]
    lines += ["## Options every command takes", ""]
    rows = [("-h, --help", "show the command's help and exit")]
    rows += [(_invocation(a), _help(a, commands[0][2].prog)) for a in shared_actions]
    lines += [*_table(rows), ""]
    for name, summary, p in commands:
        lines += _command(name, summary, p, shared)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = DOC.read_text(encoding="utf8") if DOC.is_file() else ""
        if current != text:
            print(f"{DOC.relative_to(REPO)} is out of date: run python scripts/commands_doc.py")
            return 1
        print(f"{DOC.relative_to(REPO)} is up to date")
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf8")
    print(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
