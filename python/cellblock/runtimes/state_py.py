"""Saving and loading a stateful Python kernel's globals, for `Sandbox.fork`. Runs INSIDE the
sandbox: its source is put in front of zygote_py.py's (see `zygote_source`); the host never
imports it and never unpickles what it writes. The parent's kernel saves to a file of its
scratch space, the supervisor copies that file into the fork's, and the fork's kernel loads
it, inside the fork's sandbox only.

The format is pickle protocol 5 with out-of-band buffers (objects that offer them, e.g. numpy
arrays, are written without an extra copy; large bytes are written straight from the object):

    MAGIC | pickle | buffer 0 | buffer 1 ... | len(buffer i) for each i (8 bytes each)
          | number of buffers (8) | len(pickle) (8) | MAGIC

Functions and classes defined in the session (module `__main__`) are pickled by value, as
cloudpickle does, with the stdlib only: a function as its marshalled code, name, defaults and
closure, its globals being the kernel's own (so that, in the fork, it sees the fork's
globals); a class as its name, bases and namespace. Modules are pickled as their names.
A name whose value cannot be pickled (an open file, a socket, a thread, a generator) is left
out and reported with the reason.
"""

import abc
import builtins
import dataclasses
import gc
import importlib
import marshal
import os
import pickle
import sys
import types
from typing import Any

STATE_MAGIC = b"CBSTATE1"
#: Globals of the kernel that are its own, not the session's.
STATE_OWN = frozenset({"__builtins__", "__name__", "__doc__", "__package__", "__loader__",
                       "__spec__", "__annotations__", "display"})
#: Names (with their reasons) reported at most.
STATE_MAX_SKIPPED = 200
#: Singletons that must stay themselves in the fork (dataclasses tells fields apart by them).
_SINGLETONS: dict[str, Any] = {
    n: getattr(dataclasses, n)
    for n in ("MISSING", "KW_ONLY", "_FIELD", "_FIELD_CLASSVAR", "_FIELD_INITVAR")
    if hasattr(dataclasses, n)
}


class _Empty:
    """An empty closure cell (a variable not yet bound when the function was saved)."""


def _state_make_function(code: bytes, globals_: dict[str, Any] | None, name: str,
                         cells: int) -> types.FunctionType:
    """A function of the session, without its state yet. `globals_` None: the session's own
    (the worker's `__main__`, whichever kernel loads it)."""
    if globals_ is None:
        globals_ = sys.modules["__main__"].__dict__
    closure = tuple(types.CellType() for _ in range(cells)) if cells >= 0 else None
    return types.FunctionType(marshal.loads(code), globals_, name, None, closure)


def _state_set_function(fn: types.FunctionType, state: dict[str, Any]) -> None:
    fn.__defaults__ = state["defaults"]
    fn.__kwdefaults__ = state["kwdefaults"]
    fn.__qualname__ = state["qualname"]
    fn.__module__ = state["module"]
    fn.__doc__ = state["doc"]
    fn.__annotations__ = state["annotations"]
    fn.__dict__.update(state["dict"])
    for cell, value in zip(fn.__closure__ or (), state["cells"], strict=True):
        if value is not _Empty:
            cell.cell_contents = value


def _state_make_class(meta: type, name: str, bases: tuple[type, ...],
                      created: dict[str, Any]) -> type:
    cls: type = meta(name, bases, dict(created))
    return cls


def _state_mappingproxy(items: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(items)


def _state_set_class(cls: type, state: dict[str, Any]) -> None:
    for key, value in state.items():
        setattr(cls, key, value)


def _zygote_own(obj: Any) -> str | None:
    """The name of a function or class of the server itself (these helpers, `display`)."""
    name = getattr(obj, "__name__", None)
    if isinstance(name, str) and globals().get(name) is obj:
        return name
    return None


def _state_module() -> types.ModuleType:
    """The server's own functions and classes, as a module that pickles can name: the
    fork's `__main__` is the session's module, where they are not."""
    module = sys.modules.get("_cellblock_state")
    if module is None:
        module = types.ModuleType("_cellblock_state")
        sys.modules["_cellblock_state"] = module
    for name, value in list(globals().items()):
        if isinstance(value, (types.FunctionType, type)) and _zygote_own(value):
            setattr(module, name, value)
    return module


def _defined_here(obj: Any) -> bool:
    return getattr(obj, "__module__", None) == "__main__"


def _importable(obj: Any) -> bool:
    """Whether pickle can name `obj` (module and qualified name lead back to it)."""
    name = getattr(obj, "__module__", None)
    target: Any = sys.modules.get(name) if isinstance(name, str) and name != "__main__" else None
    for part in str(getattr(obj, "__qualname__", "")).split("."):
        if target is None:
            return False
        target = getattr(target, part, None)
    return target is obj


def _code_names(code: types.CodeType) -> set[str]:
    """The global names a function's code (and the code nested in it) may use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _function_reduce(fn: types.FunctionType) -> tuple[Any, ...]:
    cells = fn.__closure__
    values = []
    for cell in cells or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:
            values.append(_Empty)
    state = {"defaults": fn.__defaults__, "kwdefaults": fn.__kwdefaults__,
             "qualname": fn.__qualname__, "module": fn.__module__, "doc": fn.__doc__,
             "annotations": fn.__annotations__, "dict": dict(fn.__dict__),
             "cells": tuple(values)}
    globals_: dict[str, Any] | None = None
    if fn.__globals__ is not sys.modules["__main__"].__dict__:
        # A function made elsewhere (e.g. a dataclass's __repr__ wrapper): as cloudpickle
        # does, only the globals its code names go with it, not its whole module.
        names = _code_names(fn.__code__)
        globals_ = {k: v for k, v in fn.__globals__.items() if k in names}
    args = (marshal.dumps(fn.__code__), globals_, fn.__name__,
            len(cells) if cells is not None else -1)
    return (_state_make_function, args, state, None, None, _state_set_function)


def _class_reduce(cls: type) -> tuple[Any, ...]:
    namespace = dict(cls.__dict__)
    for key in ("__dict__", "__weakref__"):
        namespace.pop(key, None)
    created: dict[str, Any] = {}
    slots = namespace.get("__slots__")
    if slots is not None:
        # Slots must exist when the class is made; their descriptors are made with them.
        created["__slots__"] = slots
        for slot in [slots] if isinstance(slots, str) else slots:
            namespace.pop(slot, None)
    for key in [k for k in namespace if k.startswith("_abc_")]:
        del namespace[key]  # ABCMeta's cache: made again by the metaclass
    return (_state_make_class, (type(cls), cls.__name__, cls.__bases__, created), namespace,
            None, None, _state_set_class)


class _StatePickler(pickle.Pickler):
    """No `persistent_id`: it would be called for every object (a list of a million small
    tuples would pay a Python call each); `reducer_override` is not called for exact
    ints, floats, strs, bytes, tuples, lists, dicts and sets."""

    def __init__(self, file: Any, buffers: list[Any] | None) -> None:
        super().__init__(file, protocol=5,
                         buffer_callback=buffers.append if buffers is not None else None)

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)) and (own := _zygote_own(obj)):
            return (getattr, (_state_module(), own))
        if isinstance(obj, types.FunctionType) and (_defined_here(obj) or not _importable(obj)):
            return _function_reduce(obj)
        if isinstance(obj, type) and _defined_here(obj):
            if type(obj) not in (type, abc.ABCMeta):
                # Its metaclass may make classes its own way (an Enum's does): not carried.
                raise pickle.PicklingError(
                    f"class {obj.__name__} has metaclass {type(obj).__name__}, not carried")
            return _class_reduce(obj)
        if isinstance(obj, types.ModuleType):
            return (importlib.import_module, (obj.__name__,))
        if isinstance(obj, (staticmethod, classmethod)):
            return (type(obj), (obj.__func__,))
        if isinstance(obj, types.MappingProxyType):
            return (_state_mappingproxy, (dict(obj),))
        if isinstance(obj, property):
            return (property, (obj.fget, obj.fset, obj.fdel, obj.__doc__))
        for name, single in _SINGLETONS.items():
            if obj is single:
                return (getattr, (dataclasses, name))
        return NotImplemented


class _Discard:
    """A file that counts nothing and keeps nothing: trying whether one name pickles."""

    def write(self, data: Any) -> int:
        return len(data)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:200]


def state_save(module: types.ModuleType, path: str) -> dict[str, Any]:
    """Saves the session's globals of `module` to `path`; returns {"saved": n, "skipped":
    {name: reason}}."""
    main = module.__dict__
    names = {k: v for k, v in main.items() if k not in STATE_OWN}
    skipped: dict[str, str] = {}
    try:
        _state_write(path, names)
    except Exception:
        # Find the names that cannot be carried, then save the others together (together, so
        # that two names for one object stay one object in the fork).
        for name, value in names.items():
            try:
                _StatePickler(_Discard(), []).dump(value)
            except Exception as e:
                skipped[name] = _why(e)
        for name in skipped:
            del names[name]
        _state_write(path, names)
    return {"saved": len(names), "skipped": dict(list(skipped.items())[:STATE_MAX_SKIPPED])}


def _state_write(path: str, names: dict[str, Any]) -> None:
    buffers: list[pickle.PickleBuffer] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with open(fd, "wb") as f:
        f.write(STATE_MAGIC)
        _StatePickler(f, buffers).dump(names)
        size = f.tell() - len(STATE_MAGIC)
        lengths = []
        for buf in buffers:
            with buf.raw() as raw:
                f.write(raw)
                lengths.append(raw.nbytes)
        for n in lengths:
            f.write(n.to_bytes(8, "little"))
        f.write(len(lengths).to_bytes(8, "little") + size.to_bytes(8, "little") + STATE_MAGIC)


def state_load(module: types.ModuleType, path: str) -> dict[str, Any]:
    """Loads what `state_save` wrote into `module`'s globals, then removes the file; returns
    {"loaded": n}. Raises on a file that is not such a state (a ValueError naming why)."""
    main = module.__dict__
    _state_module()  # named by what the state holds of the server's own
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.unlink(path)
    except OSError:
        pass
    with open(fd, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        if total < 32:
            raise ValueError("the saved state is truncated")
        f.seek(total - 24)
        tail = f.read(24)
        count, size = int.from_bytes(tail[:8], "little"), int.from_bytes(tail[8:16], "little")
        if tail[16:] != STATE_MAGIC or count > total // 8 or size > total:
            raise ValueError("the saved state is not a cellblock kernel state")
        table = total - 24 - 8 * count
        f.seek(table)
        lengths = [int.from_bytes(f.read(8), "little") for _ in range(count)]
        if len(STATE_MAGIC) + size + sum(lengths) != table:
            raise ValueError("the saved state's sizes do not add up")
        f.seek(len(STATE_MAGIC) + size)
        buffers = []
        for n in lengths:
            buf = bytearray(n)
            if f.readinto(buf) != n:
                raise ValueError("the saved state is truncated")
            buffers.append(buf)
        f.seek(0)
        if f.read(len(STATE_MAGIC)) != STATE_MAGIC:
            raise ValueError("the saved state is not a cellblock kernel state")
        # Many small containers made at once: the collector would run over and over for
        # nothing (they are all alive).
        collecting = gc.isenabled()
        gc.disable()
        try:
            names = pickle.Unpickler(f, buffers=buffers).load()
        finally:
            if collecting:
                gc.enable()
    if not isinstance(names, dict) or not all(isinstance(k, str) for k in names):
        raise ValueError("the saved state is not a mapping of names")
    main.update(names)
    main["__builtins__"] = builtins
    return {"loaded": len(names)}
