"""Refuse a ``torch.export`` archive (``.pt2``) that would run code from the file when loaded.

``torch.export.load`` reads a zip archive and, depending on the torch version that wrote it, unpickles
some of its members without ``weights_only`` (pickled weights and constants, sample inputs, custom
objects), loads compiled AOTInductor libraries it finds, and parses the symbolic-shape expressions of its
JSON graph with ``sympy.sympify`` (an ``eval``). Each of these runs code the archive's author chose.
:func:`check_pt2_archive` inspects every member by its *content*, not by the member names one torch
version uses, before torch sees the file:

- no two members may share a name (Python's and torch's zip readers could pick different ones);
- a member that is a zip (a ``torch.save`` file) must load with ``torch.load(..., weights_only=True)``;
- a member that is a pickle which can build objects (``GLOBAL``, ``REDUCE``, ``BUILD``, ...) must load
  with torch's restricted unpickler (``torch._weights_only_unpickler``), a legacy ``torch.save`` stream
  with ``weights_only=True``; a pickle of plain values (numbers, strings, lists) is harmless;
- no member may be native code (ELF, Mach-O, PE headers, ``.so`` / ``.dll`` / ``.dylib`` / ``.pyd``
  names, an ``aotinductor`` folder): torch would load it as a library;
- every string of a JSON member that sympy would turn into code must be an expression of sympy's own
  classes, numbers and symbol names (the code sympy would ``eval`` is checked, as
  ``sympy.parsing.sympy_parser.stringify_expr`` produces it, with Python's ``ast``).

Anything else refuses the file unless the user consents with ``--trust-pickle`` (``trust_pickle=True``).
Nothing here runs code from the archive: pickles are read with :mod:`pickletools` and the restricted
unpickler, JSON with :mod:`json`, expressions with :mod:`ast`.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import pickletools
import re
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import torch

from vitprune.errors import LoadError

#: Pickle opcodes that fetch or call Python objects: without them a pickle only builds plain values.
_OBJECT_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD",
                             "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"})
_NATIVE_MAGIC = (b"\x7fELF", b"MZ", b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe",
                 b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe")
_NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd")
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-zip ``torch.save`` stream
_SAFE_STRING = re.compile(r"^[\w.+\-]*$")  # a string sympy may parse again: no call can hide in it
_SYMBOL_NAME = re.compile(r"^[A-Za-z_]\w*$")


class UnsafeArchive(Exception):
    """A member of the archive that could run code; the message names the member and why."""


def check_pt2_archive(path: Path) -> None:
    """Raise :class:`~vitprune.errors.LoadError` (one line, naming the member) if loading ``path`` with
    ``torch.export.load`` could run code from it; see the module docstring for the rules.

    Raises:
        LoadError: not a zip archive, or a member that is not weights-only loadable (the message says to
            pass ``--trust-pickle`` if the file is trusted).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if len(set(names)) != len(names):
                dup = next(n for n in names if names.count(n) > 1)
                raise UnsafeArchive(f"two members are named {dup!r}")
            for info in archive.infolist():
                if not info.is_dir():
                    _check_member(info.filename, archive.read(info))
    except UnsafeArchive as exc:
        raise LoadError(f"{path} may run code when loaded: {exc}; pass --trust-pickle (Python: trust_pickle=True) "
                        "only if you trust where it came from") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise LoadError(f"cannot read the torch.export file {path}: not a zip archive or corrupt ({exc})") from None


def _check_member(name: str, data: bytes) -> None:
    parts = PurePosixPath(name.lower()).parts
    if data.startswith(_NATIVE_MAGIC) or name.lower().endswith(_NATIVE_SUFFIXES) or "aotinductor" in parts:
        raise UnsafeArchive(f"{name} is native code (an AOTInductor library torch would load)")
    if data.startswith(b"PK\x03\x04"):
        _check_torch_zip(name, data)
    elif (ops := _opcodes(data)) is not None:  # a pickle: its opcodes, read once
        _check_pickle(name, data, ops)
    else:
        doc = _json(data)
        if doc is not None:
            _check_json_strings(name, doc)


def _quiet_weights_only_load(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _check_torch_zip(name: str, data: bytes) -> None:
    try:
        _quiet_weights_only_load(data)
    except Exception as exc:  # the restricted unpickler raises UnpicklingError, corrupt zips RuntimeError, ...
        raise UnsafeArchive(f"{name} is a torch.save file that is not weights-only loadable "
                            f"({_first_line(exc)})") from None


def _opcodes(data: bytes) -> list[str] | None:
    """The opcode names of the first pickle in ``data`` (up to its STOP), or None if it is not one."""
    try:
        return [op.name for op, _, _ in pickletools.genops(data)]
    except Exception:  # not a pickle: ValueError on an unknown opcode, truncated argument, no STOP
        return None


def _check_pickle(name: str, data: bytes, ops: list[str]) -> None:
    if _OBJECT_OPCODES.isdisjoint(ops):  # plain values only; a legacy torch.save stream starts with its magic
        if _first_pickle_value(data) != _LEGACY_TORCH_MAGIC:
            return
    try:
        _quiet_weights_only_load(data)  # a legacy torch.save stream: every pickle in it, restricted
        return
    except Exception:
        pass
    try:
        _restricted_load(data)
    except Exception as exc:  # the restricted unpickler names the global it refused
        raise UnsafeArchive(f"{name} is a pickle that is not weights-only loadable ({_first_line(exc)})") from None


def _restricted_load(data: bytes) -> object:
    """The first pickle of ``data`` through torch's restricted unpickler; its warnings (a pickle protocol
    other than torch's) are not shown: a refusal is one line."""
    from torch._weights_only_unpickler import Unpickler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Unpickler(io.BytesIO(data)).load()


def _first_pickle_value(data: bytes) -> object:
    try:
        return _restricted_load(data)
    except Exception:  # a plain-value pickle the unpickler cannot finish builds nothing either
        return None


def _json(data: bytes) -> object | None:
    if not data.lstrip()[:1] in (b"{", b"["):
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # not JSON (torch's own parser refuses it as well)
        return None


def _strings(doc: object):
    """Every key and string value of a parsed JSON document (iteratively: JSON can nest deeper than
    Python's recursion limit)."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield from (k for k in item if isinstance(k, str))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            yield item


def _check_json_strings(name: str, doc: object) -> None:
    for text in _strings(doc):
        if "(" in text and not _harmless_for_sympify(text):
            raise UnsafeArchive(f"{name} holds an expression sympy would evaluate as code: {text[:80]!r}")


def _harmless_for_sympify(text: str) -> bool:
    """Whether ``sympy.sympify(text)`` evaluates only sympy constructors on numbers and symbol names."""
    from sympy.parsing.sympy_parser import standard_transformations, stringify_expr

    try:
        code = stringify_expr(text, {}, _parse_globals(), standard_transformations)
        tree = ast.parse(code, mode="eval")
    except Exception:  # sympy cannot tokenize it or Python cannot compile it: sympify would fail, not run it
        return True
    return all(_allowed(node) for node in ast.walk(tree))


_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.operator, ast.unaryop,
                  ast.cmpop, ast.boolop, ast.Load, ast.keyword, ast.Tuple)


def _allowed(node: ast.AST) -> bool:
    if isinstance(node, _ALLOWED_NODES):
        return True
    if isinstance(node, ast.Constant):
        return not isinstance(node.value, (str, bytes)) or bool(_SAFE_STRING.match(str(node.value)))
    if isinstance(node, ast.Name):
        return node.id in _sympy_namespace() or node.id in _torch_sympy_functions()
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and not any(isinstance(a, ast.Starred) for a in node.args)
    return False  # attributes, subscripts, lambdas, comprehensions, f-strings, ...


@functools.cache
def _parse_globals() -> dict[str, object]:
    """The names ``sympy.parse_expr`` evaluates with (``from sympy import *`` and Python's builtin
    functions, ``__import__`` among them), so that its transformations see what sympify's would."""
    import builtins
    import types

    names: dict[str, object] = {}
    exec("from sympy import *", names)  # noqa: S102 - sympy's own namespace, as parse_expr builds it
    names.update({k: v for k, v in vars(builtins).items() if isinstance(v, types.BuiltinFunctionType)})
    return names


@functools.cache
def _sympy_namespace() -> dict[str, object]:
    """sympy's classes and singletons (``Symbol``, ``Integer``, ``Mul``, ``Max``, ``oo``), nothing callable
    that is a plain function or a module."""
    import inspect

    import sympy

    return {key: value for key in dir(sympy)
            if ((inspect.isclass(value := getattr(sympy, key)) and issubclass(value, sympy.Basic))
                or isinstance(value, sympy.Basic))}


@functools.cache  # asked once per name in every expression checked
def _torch_sympy_functions() -> set[str]:
    import inspect

    import torch.utils._sympy.functions as functions

    return {k for k, v in vars(functions).items() if inspect.isclass(v)}


def _first_line(exc: BaseException) -> str:
    """The line of torch's (long) weights-only error that names what was refused, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "WeightsUnpickler error" in line]
    text = (named or lines or [type(exc).__name__])[0]
    return text.replace("WeightsUnpickler error: ", "")[:200]
