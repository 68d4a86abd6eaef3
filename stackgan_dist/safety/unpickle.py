"""A restricted unpickler for the pickles of the StackGAN data releases (downloaded from the internet).

``pickle.load`` runs whatever callable a pickle names; this loader admits only what those files hold:
numpy arrays and scalars of plain numeric (or fixed-width byte/text) dtypes, lists, tuples, dicts, sets,
str, bytes, int, float, bool and None. Anything else (``os.system``, ``builtins.eval``, arbitrary classes)
is refused with an error naming it.

Refusing names is not enough: numpy's own constructors, called with hostile arguments, read pointers from
the file (a dtype state that claims to hold objects turns the array's bytes into PyObject pointers) or
allocate whatever the file asks for (a 32-byte pickle asking for a 10 GB array). So no real class is ever
handed to the pickle machine: every allowed name maps to a checking function below, and every BUILD
(``__setstate__``) is checked before numpy sees it:

- a dtype is made only from an allowed type code (``b1 i1..i8 u1..u8 f2 f4 f8 c8 c16``, ``S<n>``,
  ``U<n>``) and its state must equal numpy's own canonical state for that code (no fields, names,
  subarray, object flags); only the byte order may vary;
- an array's data must be bytes whose length is exactly shape x itemsize (so memory is bounded by the
  file), built once, from such a dtype;
- dict keys and set members are scalars or shallow tuples (hashing a tuple nested 100 000 deep overflows
  the C stack: a crash, not an exception);
- the file is read into memory first, so a length field cannot make a reader pre-allocate it.

The pure-Python unpickler (``pickle._Unpickler``) is used because its opcodes can be overridden. Every
failure is ``UnsafePickle`` (an ``UnpicklingError``) from ``safe_loads`` and ``DataError`` naming the file
from ``safe_load``. The releases were written by Python 2, so ``encoding='latin1'`` is the default.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import reprlib
import struct

import numpy as np

from ..errors import DataError
from .files import open_regular


class UnsafePickle(pickle.UnpicklingError):
    """A pickle refused (a name or a value outside what the loader admits) or unreadable."""


_NUMERIC = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16")
_MAX_FLEX = 1 << 20  # S<n> / U<n>: at most this many characters per element
_MAX_KEY_DEPTH = 16  # nesting of tuples used as dict keys or set members


class _NdarraySentinel:
    """What ``numpy.ndarray`` resolves to: only ever an argument of ``_reconstruct``."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarraySentinel()


def _plain_dtype_code(obj) -> str:
    if isinstance(obj, bytes):
        obj = obj.decode("latin1")
    if not isinstance(obj, str):
        raise UnsafePickle(f"refused numpy dtype {type(obj).__name__!r}: only plain numeric dtypes are allowed")
    if obj in _NUMERIC:
        return obj
    if len(obj) > 1 and obj[0] in "SU" and obj[1:].isdigit() and 0 < int(obj[1:]) <= _MAX_FLEX:
        return obj
    raise UnsafePickle(f"refused numpy dtype {obj[:40]!r}: only plain numeric dtypes are allowed")


def _check_plain(dt) -> np.dtype:
    """A real dtype that holds no objects, fields or sub-arrays (checked on the object itself)."""
    if not isinstance(dt, np.dtype):
        raise UnsafePickle(f"refused: expected a numpy dtype, got {type(dt).__name__}")
    if dt.hasobject or dt.fields is not None or dt.names is not None or dt.subdtype is not None \
            or dt.kind not in "biufcSU" or dt.itemsize <= 0 or dt.flags & ~0x08:  # 0x08: U's NEEDS_INIT
        raise UnsafePickle(f"refused numpy dtype {dt.str!r}: only plain numeric dtypes are allowed")
    return dt


def _dtype(obj, align=False, copy=True, *rest):
    """``numpy.dtype(obj, align, copy)``: a fresh copy (a later BUILD must not touch numpy's singletons)."""
    if rest or align not in (False, 0) or copy not in (True, 1):
        raise UnsafePickle("refused numpy dtype arguments (expected (code, False, True))")
    return np.dtype(_plain_dtype_code(obj), False, True)


def _canonical_states(dt: np.dtype) -> list[tuple]:
    st = np.dtype(dt.str).__reduce__()[2]
    orders = ("|",) if st[1] == "|" else ("<", ">", "=")
    return [(st[0], o, *st[2:]) for o in orders]


def _shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > 32 or not all(
            type(n) is int and n >= 0 for n in shape):
        raise UnsafePickle(f"refused array shape {reprlib.repr(shape)}: expected a tuple of non-negative ints")
    return shape


def _raw_bytes(data) -> bytes:
    if isinstance(data, str):  # Python 2 str, decoded as latin1 by the unpickler
        return data.encode("latin1")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    raise UnsafePickle(f"refused array data of type {type(data).__name__}: expected bytes")


def _exact_size(shape, dt: np.dtype, n: int) -> None:
    need = math.prod(shape) * dt.itemsize
    if need != n:
        raise UnsafePickle(f"refused array: shape {shape} of {dt.str} needs {need} bytes, the file holds {n}")


def _reconstruct(subtype, shape, code, *rest):
    """``numpy.core.multiarray._reconstruct``: numpy pickles always call it as (ndarray, (0,), b'b');
    the real shape and data come in the BUILD state, checked in ``_build_array``."""
    if rest or subtype is not _NDARRAY or shape != (0,) or code not in (b"b", "b"):
        raise UnsafePickle("refused numpy _reconstruct arguments (expected (ndarray, (0,), b'b'))")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _scalar(dt, data=None, *rest):
    """``numpy.core.multiarray.scalar(dtype, bytes)``: exactly one item's bytes of a plain dtype."""
    if rest or data is None:
        raise UnsafePickle("refused numpy scalar arguments (expected (dtype, bytes))")
    dt = _check_plain(dt)
    raw = _raw_bytes(data)
    _exact_size((), dt, len(raw))
    return np.frombuffer(raw, dtype=dt)[0].copy()


def _frombuffer(buf, dt, shape, order="C", *rest):
    """``numpy.core.numeric._frombuffer`` (protocol 5 pickles): a copy, of exactly the bytes given."""
    if rest or order not in ("C", "F"):
        raise UnsafePickle("refused numpy _frombuffer arguments")
    dt, shape = _check_plain(dt), _shape(shape)
    raw = _raw_bytes(buf)
    _exact_size(shape, dt, len(raw))
    return np.frombuffer(raw, dtype=dt).reshape(shape, order=order).copy()


_SCALARS = (str, bytes, int, float, bool, complex, type(None))


def _check_key(k) -> None:
    """Dict keys and set members: scalars, frozensets (already checked), or tuples at most 16 deep."""
    todo = [(k, 0)]
    while todo:
        x, depth = todo.pop()
        if isinstance(x, tuple):
            if depth >= _MAX_KEY_DEPTH:
                raise UnsafePickle(f"refused a dict key or set member nested deeper than {_MAX_KEY_DEPTH}")
            todo.extend((v, depth + 1) for v in x)
        elif not isinstance(x, (*_SCALARS, frozenset, np.generic)):
            raise UnsafePickle(f"refused a {type(x).__name__} as dict key or set member")


def _items(x):
    if not isinstance(x, (list, tuple, set, frozenset, dict, str, bytes, bytearray)):
        raise UnsafePickle(f"refused an iterable of type {type(x).__name__}")
    return x


def _list(x=()):
    return list(_items(x))


def _tuple(x=()):
    return tuple(_items(x))


def _set(x=()):
    x = list(_items(x))
    for k in x:
        _check_key(k)
    return set(x)


def _frozenset(x=()):
    return frozenset(_set(x))


def _dict(x=()):
    if isinstance(x, dict):
        return dict(x)
    out = {}
    for pair in _items(x):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise UnsafePickle("refused dict() argument: expected (key, value) pairs")
        _check_key(pair[0])
        out[pair[0]] = pair[1]
    return out


def _scalar_arg(name, x):
    if not isinstance(x, _SCALARS):
        raise UnsafePickle(f"refused {name}() of a {type(x).__name__}")
    return x


def _str(x="", *rest):
    if rest:  # str(bytes, encoding[, errors])
        if not isinstance(x, bytes) or not all(isinstance(r, str) for r in rest) or len(rest) > 2:
            raise UnsafePickle("refused str() arguments")
        return str(x, *rest)
    return str(_scalar_arg("str", x))


def _bytes(x=b"", *rest):
    if isinstance(x, int) or rest and not isinstance(x, str):  # bytes(N) allocates N bytes
        raise UnsafePickle("refused bytes() of a size (a pickle asking for memory)")
    if isinstance(x, (list, tuple)):
        return bytes(x)
    if isinstance(x, str):
        if len(rest) > 2 or not all(isinstance(r, str) for r in rest):
            raise UnsafePickle("refused bytes() arguments")
        return bytes(x, *rest) if rest else bytes(x, "latin1")
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    raise UnsafePickle(f"refused bytes() of a {type(x).__name__}")


def _bytearray(x=b"", *rest):
    return bytearray(_bytes(x, *rest))


def _int(x=0, *rest):
    if rest and not (len(rest) == 1 and isinstance(x, (str, bytes)) and type(rest[0]) is int):
        raise UnsafePickle("refused int() arguments")
    return int(_scalar_arg("int", x), *rest)


def _float(x=0.0):
    return float(_scalar_arg("float", x))


def _complex(x=0.0, y=0.0):
    return complex(_scalar_arg("complex", x), _scalar_arg("complex", y))


def _bool(x=False):
    return bool(_scalar_arg("bool", x))


def _codecs_encode(s, encoding="utf-8", errors="strict"):
    """Protocol-2 pickles of bytes written by Python 3: ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(s, str) or encoding not in ("latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1") \
            or errors != "strict":
        raise UnsafePickle("refused _codecs.encode arguments (only latin1 encoding of a str)")
    return s.encode("latin1")


_GLOBALS = {("numpy", "dtype"): _dtype, ("numpy", "ndarray"): _NDARRAY}
for _m in ("numpy.core", "numpy._core"):
    _GLOBALS[(f"{_m}.multiarray", "_reconstruct")] = _reconstruct
    _GLOBALS[(f"{_m}.multiarray", "scalar")] = _scalar
    _GLOBALS[(f"{_m}.numeric", "_frombuffer")] = _frombuffer
for _m in ("builtins", "__builtin__"):
    _GLOBALS.update({(_m, "list"): _list, (_m, "tuple"): _tuple, (_m, "dict"): _dict, (_m, "set"): _set,
                     (_m, "frozenset"): _frozenset, (_m, "str"): _str, (_m, "bytes"): _bytes,
                     (_m, "bytearray"): _bytearray, (_m, "int"): _int, (_m, "float"): _float,
                     (_m, "bool"): _bool, (_m, "complex"): _complex})
_GLOBALS.update({("__builtin__", "unicode"): _str, ("__builtin__", "long"): _int,
                 ("_codecs", "encode"): _codecs_encode})
ALLOWED = frozenset(_GLOBALS)


class RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001 -- the pure-Python one: opcodes can be overridden
    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

    def __init__(self, file, *, encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self._built: set[int] = set()
        self._keep: list = []  # keeps built objects alive so their ids stay unique

    def find_class(self, module: str, name: str):
        try:
            return _GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickle(f"refused to load global '{module}.{name}': only numpy arrays, lists, tuples, "
                               "dicts, str, int and float are allowed") from None

    # BUILD (__setstate__): only on the dtypes and arrays made by the functions above, checked first
    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if id(inst) in self._built:
            raise UnsafePickle("refused a second BUILD of the same object")
        if isinstance(inst, np.dtype):
            if not isinstance(state, tuple) or state not in _canonical_states(inst):
                raise UnsafePickle(f"refused numpy dtype state {reprlib.repr(state)}: only plain numeric dtypes "
                                   f"are allowed (the state of {inst.str!r} may not add fields, objects or "
                                   "sub-arrays)")
            inst.__setstate__(state)
            _check_plain(inst)
        elif type(inst) is np.ndarray:
            if not isinstance(state, tuple) or len(state) not in (4, 5):
                raise UnsafePickle("refused numpy array state: expected (version, shape, dtype, fortran, data)")
            shape, dt, fortran, data = state[-4:]
            if len(state) == 5 and state[0] != 1:
                raise UnsafePickle(f"refused numpy array state version {reprlib.repr(state[0])}")
            shape, dt, raw = _shape(shape), _check_plain(dt), _raw_bytes(data)
            if not isinstance(fortran, bool):
                raise UnsafePickle("refused numpy array state: fortran flag is not a bool")
            _exact_size(shape, dt, len(raw))
            inst.__setstate__((1, shape, dt, fortran, raw))
        else:
            raise UnsafePickle(f"refused BUILD (__setstate__) of a {type(inst).__name__}")
        self._built.add(id(inst))
        self._keep.append(inst)

    def _load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        _check_key(key)
        self._mapping()[key] = value

    def _load_setitems(self):
        items = self.pop_mark()
        d = self._mapping()
        for i in range(0, len(items) - 1, 2):
            _check_key(items[i])
            d[items[i]] = items[i + 1]

    def _mapping(self) -> dict:
        d = self.stack[-1]
        if type(d) is not dict:
            raise UnsafePickle(f"refused SETITEM on a {type(d).__name__}")
        return d

    def _load_dict(self):
        items = self.pop_mark()
        for k in items[::2]:
            _check_key(k)
        self.append({items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)})

    def _load_additems(self):
        items = self.pop_mark()
        s = self.stack[-1]
        if type(s) is not set:
            raise UnsafePickle(f"refused ADDITEMS on a {type(s).__name__}")
        for k in items:
            _check_key(k)
        s.update(items)

    def _load_frozenset(self):
        self.append(_frozenset(self.pop_mark()))

    def _load_newobj(self):
        raise UnsafePickle("refused NEWOBJ (object construction through __new__)")

    def _load_bytearray8(self):
        # the pure-Python loader allocates the announced length before reading: a 20-byte file could ask for
        # 10 GB. Read what is there (bounded by the file), then copy.
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)
        if len(data) != n:
            raise UnsafePickle(f"not a readable pickle (BYTEARRAY8 announces {n} bytes, the file holds {len(data)})")
        self.append(bytearray(data))

    def _load_persid(self):
        raise UnsafePickle("refused a persistent id")

    for _op, _fn in ((pickle.BUILD, _load_build), (pickle.SETITEM, _load_setitem),
                     (pickle.SETITEMS, _load_setitems), (pickle.DICT, _load_dict),
                     (pickle.ADDITEMS, _load_additems), (pickle.FROZENSET, _load_frozenset),
                     (pickle.NEWOBJ, _load_newobj), (pickle.NEWOBJ_EX, _load_newobj),
                     (pickle.PERSID, _load_persid), (pickle.BINPERSID, _load_persid),
                     (pickle.BYTEARRAY8, _load_bytearray8)):
        dispatch[_op[0]] = _fn
    del _op, _fn


_DATA = (str, bytes, bytearray, int, float, complex, bool, type(None), np.generic)


def _only_data(out) -> None:
    """The result holds data only: a damaged pickle can leave one of the checking functions (a GLOBAL
    without its REDUCE) or a bare dtype on the stack; those are refused, not handed to the caller."""
    todo, seen = [out], set()
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, (list, tuple, set, frozenset)):
            todo.extend(x)
        elif isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, np.ndarray):
            if x.dtype.hasobject or x.dtype.fields is not None:
                raise UnsafePickle(f"refused array of dtype {x.dtype.str!r} in the result")
        elif not isinstance(x, _DATA):
            raise UnsafePickle(f"refused {type(x).__name__} in the result: only plain data may come out")


def safe_loads(data: bytes, encoding: str = "latin1"):
    """Unpickles ``data`` with the restricted unpickler; any refusal or damage raises ``UnsafePickle``.
    MemoryError is not caught: with the checks above it means a legitimately large file, not a small
    hostile one."""
    try:
        out = RestrictedUnpickler(io.BytesIO(bytes(data)), encoding=encoding).load()
        _only_data(out)
        return out
    except UnsafePickle:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 -- every way a damaged pickle fails becomes one error type
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise UnsafePickle(f"not a readable pickle ({type(e).__name__}{': ' + msg if msg else ''})") from None


def safe_load(path: str, encoding: str = "latin1"):
    """Load ``path`` with the restricted unpickler. Raises DataError naming the file on refusal or damage."""
    try:
        if not os.path.lexists(path):
            raise FileNotFoundError(path)
        with open_regular(path, "pickle") as f:
            data = f.read()  # whole: a length field in the file cannot make a reader pre-allocate it
    except FileNotFoundError:
        raise DataError(f"pickle not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return safe_loads(data, encoding=encoding)
    except UnsafePickle as e:
        raise DataError(f"{path}: {e}") from None
