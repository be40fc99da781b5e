"""Typed config values: one check of every dataclass field against its declared type.

Every config in minigpt is a frozen dataclass whose `__post_init__` calls `check_fields`,
so a value is checked the same way whether it came from Python, a TOML or JSON file, or
the command line. Files and Python give typed values, which must already have the
field's type (an int is accepted for a float, a bool is never accepted for a number, and
a string is never a number or a boolean: ``lr = "1e-3"`` is an error that says to drop
the quotes). The command line only gives strings; `parse_cli` converts them by the
field's type, and `BOOL_WORDS` is the one list of the spellings a boolean accepts there.

Path fields are annotated `PathStr`; their ``~`` is expanded. Each field is documented by the
string right after it in the class body; `field_docs` reads those, so that the command line's
help is the dataclass's own (`minigpt.cli.common.add_field`).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import textwrap
import types
import typing
from typing import Annotated, Any, Literal, Union

EXPAND_USER = "expand_user"
PathStr = Annotated[str, EXPAND_USER]
"""A file or folder path given as text; ``~`` is expanded on construction."""

# The command line's spellings of a boolean (compared lower-cased). Files use their own
# booleans (TOML/JSON true and false) and accept nothing else.
BOOL_WORDS: dict[str, bool] = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
NONE_WORDS = ("none", "null")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint (with `Annotated` extras) of dataclass `cls`."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring (the string literal right after the field in the
    class body, cleaned like a docstring) for dataclass `cls` and the dataclasses it extends.
    Fields without one are left out. Read once from the source, then cached."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        (class_def,) = ast.parse(textwrap.dedent(inspect.getsource(klass))).body
        body = class_def.body
        for statement, following in zip(body, body[1:]):
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) \
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                    and isinstance(following.value.value, str):
                docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def check_count(name: str, value: Any, minimum: int = 1, fix: str = "") -> None:
    """ValueError unless `value` is an integer (never a bool) >= `minimum`. Every count a
    command takes outside a config dataclass (batch sizes, limits, shots) is checked here
    where it enters, before any work, so a 0 is one clear line and not a `range()` or
    division error halfway through."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}" + (f"; {fix}" if fix else ""))


def check_fields(obj: Any) -> None:
    """Check every field of dataclass instance `obj` against its declared type; normalise
    where the type allows it (int -> float, list -> tuple, ``~`` expanded) in place.

    Raises ValueError naming the class, field, value, expected type and the fix.
    """
    cls = type(obj)
    for name, tp in field_types(cls).items():
        value = getattr(obj, name)
        checked = check_value(value, tp, name, owner=cls.__name__)
        if checked is not value:
            object.__setattr__(obj, name, checked)


def check_value(value: Any, tp: Any, name: str, owner: str = "", syntax: str = "python") -> Any:
    """`value` as a `tp`, or ValueError naming `owner.name`; `syntax` ('python', 'toml'
    or 'json') picks how the fix is spelled."""
    try:
        return _check(value, tp)
    except _Mismatch as err:
        where = f"{owner}.{name}" if owner else name
        expected = describe(tp)
        fix = _fix(value, tp, name, syntax)
        raise ValueError(f"{where}={value!r} ({type(value).__name__}) {err.rule or 'must be ' + expected}"
                         f"{'; ' + fix if fix else ''}") from None


class _Mismatch(Exception):
    def __init__(self, rule: str = "") -> None:
        super().__init__(rule)
        self.rule = rule


def _check(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        if EXPAND_USER in args[1:] and isinstance(value, os.PathLike):
            value = os.fspath(value)  # a pathlib.Path is as good as its text
        checked = _check(value, args[0])
        if EXPAND_USER in args[1:] and isinstance(checked, str):
            if not checked.strip():
                raise _Mismatch("must be a path, not empty text")
            return os.path.expanduser(checked)
        return checked
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: keep X's own rule (e.g. "must be a finite number")
            try:
                return _check(value, options[0])
            except _Mismatch as err:
                raise _Mismatch(f"{err.rule}, or None" if err.rule else "") from None
        for option in options:
            try:
                return _check(value, option)
            except _Mismatch:
                continue
        raise _Mismatch()
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _Mismatch(f"must be one of {', '.join(map(repr, args))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise _Mismatch("is too large for a float") from None
            if not math.isfinite(number):
                raise _Mismatch("must be a finite number")
            return number
        raise _Mismatch()
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch(f"must have {len(args)} entries")
        return tuple(_check(v, a) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch()
        return [_check(v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch()
        return {_check(k, args[0]): _check(v, args[1]) for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch()
    return value  # a type we do not check (e.g. a callable); the class's own rules apply


def describe(tp: Any) -> str:
    """A type in words: 'a float (a number)', 'an integer or None', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return describe(args[0])
    if origin in (Union, types.UnionType):
        words = [describe(a) for a in args if a is not type(None)]
        if type(None) in args:
            words.append("None")
        return " or ".join(words)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple or origin is list:
        kind = "tuple (or list)" if origin is tuple else "list"
        return f"a {kind} of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, f"a {getattr(tp, '__name__', tp)}")


def _spell(name: str, text: str, syntax: str) -> str:
    return {"toml": f"{name} = {text}", "json": f'"{name}": {text}'}.get(syntax, f"{name}={text}")


def _fix(value: Any, tp: Any, name: str, syntax: str) -> str:
    """How to write a wrong value right, when we can tell."""
    if not isinstance(value, str):
        if isinstance(value, bool):
            return f"write a number, not {str(value).lower()}"
        if isinstance(value, float) and value.is_integer() and _accepts(tp, int):
            return f"write {_spell(name, str(int(value)), syntax)}"
        return ""
    text = value.strip()
    if _accepts(tp, bool) and text.lower() in BOOL_WORDS:
        word = BOOL_WORDS[text.lower()]
        return f"write {_spell(name, str(word) if syntax == 'python' else str(word).lower(), syntax)} without quotes"
    if typing.get_origin(bare_type(tp)) in (tuple, list):
        return f"write a list, e.g. {_spell(name, json.dumps([value]), syntax)}"
    for number in (int, float):
        if _accepts(tp, number):
            try:
                parsed = number(text)
            except ValueError:
                continue
            if number is int or math.isfinite(parsed):
                return f"write {_spell(name, text, syntax)} without quotes"
    return ""


def bare_type(tp: Any) -> Any:
    """`tp` without `Annotated` and `| None`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return bare_type(args[0])
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return bare_type(rest[0]) if len(rest) == 1 else tp
    return tp


def _accepts(tp: Any, simple: type) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _accepts(args[0], simple)
    if origin in (Union, types.UnionType):
        return any(_accepts(a, simple) for a in args)
    return tp is simple or (simple is int and tp is float)


def parse_cli(text: str, tp: Any, flag: str) -> Any:
    """A command-line string as a value of type `tp` (then checked like any other value).

    Booleans take `BOOL_WORDS`; `X | None` takes 'none'/'null'; numbers take Python's
    spelling (1e-3, 1_000); tuples and lists take a JSON list or comma-separated items.
    Raises ValueError naming `flag` when the text is not a `tp`.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return parse_cli(text, args[0], flag)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.strip().lower() in NONE_WORDS:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message says what X takes
            return parse_cli(text, options[0], flag)
        for option in options:
            try:
                return parse_cli(text, option, flag)
            except ValueError:
                continue
        raise ValueError(f"{flag}={text!r} must be {describe(tp)}")
    if tp is bool:
        word = text.strip().lower()
        if word not in BOOL_WORDS:
            raise ValueError(f"{flag}={text!r} must be a boolean: one of {', '.join(BOOL_WORDS)}")
        return BOOL_WORDS[word]
    if tp in (int, float):
        try:
            return tp(text.strip())
        except ValueError:
            example = "3" if tp is int else "1e-3"
            try:
                if tp is int and float(text).is_integer():
                    example = str(int(float(text)))  # '1e3' -> '1000'
            except (ValueError, OverflowError):
                pass
            raise ValueError(f"{flag}={text!r} must be {describe(tp)}; write e.g. {flag}={example}") from None
    if origin in (tuple, list):
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise ValueError(f"{flag}={text!r} is not a JSON list ({err}); write e.g. {flag}=a,b") from None
        else:
            items = [part.strip() for part in stripped.split(",") if part.strip()]
        item_type = args[0]
        return [parse_cli(i, item_type, flag) if isinstance(i, str) else i for i in items]
    if origin is Literal or tp is str:
        return text
    if tp is Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text
