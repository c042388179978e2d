"""Command-line options declared once, as dataclass fields: a field's metadata holds its flags and its help.

    @dataclass
    class Opts:
        workers: int = option(1, "--workers", "-workers", help="processes that tokenize")
        strict: bool = option(False, "--strict", help="stop at the first bad record")

    parser = build_parser("prog", [Opts], description="…")
    (opts,), problems = parse(parser, argv)     # or: (opts,) = parse_or_exit(parser, argv)

Types come from the annotations: ``str``, ``int``, ``float``, ``Path``, ``bool``, ``Literal[...]`` (choices),
``X | None`` and, with ``parse=``, a value built from the repeated strings (``--map a=b --map c=d``). Booleans
take the seed's spelling, ``--strict true`` / ``--strict false``, as well as a bare ``--strict``; ``negate=``
adds flags that set False (``--no-progress``). A legacy spelling of an option is either one more flag of its
field or, when the old and the new spelling could disagree on one command line, a ``legacy=`` group of its own:
two different values are then a conflict that names both. A flag declared twice fails when the parser is
built (argparse), an option name declared by two dataclasses of one parser fails here. Parsing imports nothing
and changes nothing: it only builds the dataclasses, whose ``__post_init__`` rejects bad values.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

TRUE, FALSE = ("true", "yes", "y", "t", "1"), ("false", "no", "n", "f", "0")
LEGACY_GROUP = "legacy flags (the original script's spelling)"


def option(default: Any = dataclasses.MISSING, *flags: str, help: str, metavar: str | None = None,
           negate: tuple[str, ...] = (), legacy: tuple[tuple[str, ...], ...] = (), group: str | None = None,
           parse: Callable[[list[str]], Any] | None = None, nargs: str | None = None, cli: bool = True,
           show_default: bool = True) -> Any:
    """A dataclass field that is also a command-line option. No flags: a positional argument (``nargs``)."""
    metadata = {"help": help, "flags": flags, "metavar": metavar, "negate": negate, "legacy": legacy,
                "group": group, "parse": parse, "nargs": nargs, "cli": cli, "show_default": show_default}
    return dataclasses.field(default=default, metadata=metadata)


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _base(tp: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1:
            return arms[0], True
    return tp, False


def _cli_fields(cls: type, only: Iterable[str] | None) -> list[dataclasses.Field]:
    keep = None if only is None else set(only)
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli") and (keep is None or f.name in keep)]


def _legacy_dest(name: str, i: int) -> str:
    return f"_legacy_{name}_{i}"


class OptionParser(argparse.ArgumentParser):
    """An ArgumentParser that remembers which dataclasses it was built from (see ``parse``)."""

    specs: list[tuple[type, list[dataclasses.Field]]]
    bool_flags: set[str]


def build_parser(prog: str, classes: Sequence[type | tuple[type, Iterable[str]]], *, description: str | None = None,
                 epilog: str | None = None, defaults: dict[str, Any] | None = None,
                 formatter_class: type = argparse.HelpFormatter) -> OptionParser:
    """One parser for the fields of ``classes`` (a class, or ``(class, field names)`` for some of its fields);
    ``defaults`` replaces field defaults for this command (binarize: ``workers=2``)."""
    parser = OptionParser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                          formatter_class=formatter_class)
    parser.specs, parser.bool_flags = [], set()
    defaults = defaults or {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    owner: dict[str, str] = {}

    def group(title: str) -> argparse._ArgumentGroup:
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        return groups[title]

    for spec in classes:
        cls, only = spec if isinstance(spec, tuple) else (spec, None)
        hints = typing.get_type_hints(cls)
        fields = _cli_fields(cls, only)
        parser.specs.append((cls, fields))
        for f in fields:
            if f.name in owner:
                raise ValueError(f"option {f.name!r} is declared by both {owner[f.name]} and {cls.__name__}")
            owner[f.name] = cls.__name__
            md = f.metadata
            where = group(md["group"]) if md["group"] else parser
            default = defaults.get(f.name, f.default)
            if md["legacy"] and default is not None:
                raise ValueError(f"{cls.__name__}.{f.name}: an option with legacy spellings needs the default None "
                                 "(an unset option is how a conflict is told from a default)")
            _add(parser, where, f, hints[f.name], default)
            for i, spelling in enumerate(md["legacy"]):
                legacy = group(LEGACY_GROUP)
                kwargs = {"dest": _legacy_dest(f.name, i), "default": None,
                          "help": f"= {_display(f)}", "metavar": md["metavar"]}
                tp, _ = _base(hints[f.name])
                if tp is bool:
                    parser.bool_flags.update(spelling)
                    kwargs.update(nargs="?", const=True, type=parse_bool, metavar="true|false")
                elif tp in (int, float, Path):
                    kwargs["type"] = tp
                legacy.add_argument(*spelling, **kwargs)
    return parser


def _display(f: dataclasses.Field) -> str:
    flags = f.metadata["flags"]
    return flags[0] if flags else f.name.upper()


def _help(f: dataclasses.Field, default: Any) -> str:
    text = f.metadata["help"]
    if f.metadata["show_default"] and default not in (None, False, dataclasses.MISSING, "") and "default" not in text:
        text += f" (default {default})"
    return text


def _add(parser: OptionParser, where: Any, f: dataclasses.Field, hint: Any, default: Any) -> None:
    md = f.metadata
    tp, _ = _base(hint)
    kwargs: dict[str, Any] = {"help": _help(f, default), "dest": f.name}
    if md["metavar"]:
        kwargs["metavar"] = md["metavar"]
    if md["parse"] is not None:  # repeated strings, turned into the field's value after parsing
        kwargs.update(action="append", default=[])
    elif tp is bool:
        kwargs.update(nargs="?", const=True, type=parse_bool, default=default, metavar="true|false")
        parser.bool_flags.update(md["flags"])
    elif typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        kwargs.update(choices=choices, default=default, type=type(choices[0]))
    elif tp in (int, float, str, Path):
        kwargs.update(type=tp, default=default)
    else:
        raise TypeError(f"{f.name}: no command-line form for type {tp!r} (give parse=)")
    if md["flags"]:
        if default is dataclasses.MISSING and md["parse"] is None:
            kwargs.pop("default", None)
            kwargs["required"] = True
        where.add_argument(*md["flags"], **kwargs)
    elif not md["negate"]:  # positional
        kwargs.pop("dest")
        if md["nargs"]:
            kwargs["nargs"] = md["nargs"]
        if default is dataclasses.MISSING:
            kwargs.pop("default", None)
        where.add_argument(f.name, **kwargs)
    if md["negate"]:
        where.add_argument(*md["negate"], dest=f.name, action="store_const", const=False, default=default,
                           help=md["help"])


def _bool_values_joined(argv: Sequence[str], bool_flags: set[str]) -> list[str]:
    """``--strict true`` → ``--strict=true``; a bare ``--strict`` → ``--strict=true``. A boolean flag therefore
    never swallows the next argument (``--tokenize ./raw`` keeps ./raw as the input)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in bool_flags:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and nxt.strip().lower() in TRUE + FALSE:
                out.append(f"{token}={nxt}")
                i += 2
                continue
            out.append(f"{token}=true")
        else:
            out.append(token)
        i += 1
    return out


def parse(parser: OptionParser, argv: Sequence[str] | None) -> tuple[list[Any], list[str]]:
    """The dataclasses of ``parser`` built from ``argv`` (None where one could not be built), and every problem:
    conflicting spellings, values the parse function refused, the dataclasses' own checks."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(_bool_values_joined(argv, parser.bool_flags))
    built: list[Any] = []
    problems: list[str] = []
    for cls, fields in parser.specs:
        values: dict[str, Any] = {}
        for f in fields:
            value = getattr(ns, f.name)
            given = [(_display(f), value)] if value is not None else []
            for i, spelling in enumerate(f.metadata["legacy"]):
                old = getattr(ns, _legacy_dest(f.name, i))
                if old is not None:
                    given.append((spelling[0], old))
            if len({repr(v) for _, v in given}) > 1:
                problems.append(" and ".join(f"{n} {v!r}" for n, v in given) + " conflict; give one")
            if given:
                value = given[0][1]
            if f.metadata["parse"] is not None:
                try:
                    value = f.metadata["parse"](value) if value else None
                except ValueError as err:
                    problems.append(str(err))
                    value = None
            values[f.name] = value
        try:
            built.append(cls(**values))
        except (TypeError, ValueError) as err:
            problems.append(str(err))
            built.append(None)
    return built, problems


def parse_or_exit(parser: OptionParser, argv: Sequence[str] | None) -> list[Any]:
    """``parse``, or exit 2 naming every problem at once in argparse's own form (usage, then ``prog: error: …``),
    as a bad flag or a missing required one already does."""
    built, problems = parse(parser, argv)
    if problems:
        parser.error("\n  ".join(problems))
    return built


def declared_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser`` (``-h`` included), in declaration order."""
    return [s for action in parser._actions for s in action.option_strings]
