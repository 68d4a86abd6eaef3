"""A restricted unpickler for the pickles of the StackGAN data releases (downloaded from the internet).

``pickle.load`` runs whatever callable a pickle names; this loader admits only what those files hold:
numpy arrays and scalars, lists, tuples, dicts, str, bytes, int, float, bool and None. Anything else
(``os.system``, ``builtins.eval``, arbitrary classes) is refused with an error naming it.
The releases were written by Python 2, so ``encoding='latin1'`` is the default (as the original loaders use).
"""
from __future__ import annotations

import io
import pickle

from ..errors import DataError

# (module, name) pairs a numpy / builtin-container pickle needs; each is a constructor of plain data.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("builtins", "list"), ("builtins", "tuple"), ("builtins", "dict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "bool"), ("builtins", "complex"),
    ("__builtin__", "list"), ("__builtin__", "tuple"), ("__builtin__", "dict"), ("__builtin__", "set"),
    ("__builtin__", "str"), ("__builtin__", "unicode"), ("__builtin__", "int"), ("__builtin__", "long"),
    ("__builtin__", "float"), ("__builtin__", "bool"),
    # protocol-2 pickles of bytes written by Python 3: _codecs.encode(str, 'latin1') -> bytes
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load global '{module}.{name}': only numpy arrays, lists, "
                                     "tuples, dicts, str, int and float are allowed")


def safe_loads(data: bytes, encoding: str = "latin1"):
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def safe_load(path: str, encoding: str = "latin1"):
    """Load ``path`` with the restricted unpickler. Raises DataError naming the file on refusal or damage."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding=encoding).load()
    except FileNotFoundError:
        raise DataError(f"pickle not found: {path}") from None
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
