"""Sequential tar reading: the regular-file members of a tar stream, in file order.

A port of what ``tarfile.open(fileobj=f, mode="r|")`` delivers (CPython 3.11's ``TarFile.next``,
``TarInfo.frombuf`` and the GNU long-name and pax handlers), without building a ``TarInfo`` object per
member: tarfile's per-member Python overhead is ~3x this reader's (benchmarks/dataloader.py, ``tar_reader``
row). tests/test_tar_reader.py checks, with hypothesis, that it yields the same members and raises where
tarfile raises on random ustar, GNU and pax archives cut at any byte. Same rules as tarfile, which matter
for damaged shards:

- an empty stream, or a first header that is cut short or has a bad checksum, raises ``TarDamaged``;
- a later header that is cut short or has a bad checksum ends the archive quietly (tarfile's choice: the
  loader counts what a shard failed to deliver against dataset.json and logs it);
- a member whose data or padding is cut short, and a header after a GNU long-name or pax header that is
  missing or bad, raise ``TarDamaged``.

Deliberate differences, for hostile files only (the property test does not generate them): a member larger
than ``MAX_MEMBER`` bytes, a negative size, and GNU sparse members raise ``TarDamaged`` (tarfile would
read them); nothing else is supported because shards hold plain files.
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator

BLOCK = 512
MAX_MEMBER = 1 << 30  # a sample's file (a JPEG, an embedding) is far smaller: refuse, do not allocate
_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES without GNU sparse (b"S": refused)
_SUPPORTED = (b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"L", b"K", b"S")
_GNU = (b"L", b"K", b"S")
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_PAX_NUMBERS = {"atime", "ctime", "mtime", "uid", "gid", "size"}
_PAX_FIELDS = {"path", "linkpath", "size", "mtime", "uid", "gid", "uname", "gname"}


class TarDamaged(tarfile.ReadError):
    """A truncated or corrupt tar (raised mid-stream, as tarfile's ReadError, webdataset#142)."""


class _HeaderError(Exception):
    """A header tarfile would call invalid, truncated or empty (``kind`` says which)."""

    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind


def _nts(b: bytes) -> str:
    p = b.find(b"\0")
    return (b if p == -1 else b[:p]).decode("utf-8", "surrogateescape")


def _nti(b: bytes) -> int:
    if b[0] in (0o200, 0o377):  # GNU base-256
        n = int.from_bytes(b[1:], "big")
        return -(256 ** (len(b) - 1) - n) if b[0] == 0o377 else n
    p = b.find(b"\0")
    s = b if p == -1 else b[:p]
    try:
        return int(s.decode("ascii").strip() or "0", 8)
    except (UnicodeDecodeError, ValueError):
        raise _HeaderError("invalid", "invalid header") from None


def _block(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _read(f, n: int) -> bytes:
    """Up to n bytes; short only at the end of the stream (pipes may return short reads)."""
    if n <= 0:
        return b""
    b = f.read(n)
    if len(b) < n and b:
        parts, got = [b], len(b)
        while got < n:
            c = f.read(n - got)
            if not c:
                break
            parts.append(c)
            got += len(c)
        b = b"".join(parts)
    return b


class _Header:
    __slots__ = ("name", "type", "size")

    def __init__(self, buf: bytes):
        if not buf:
            raise _HeaderError("empty", "empty header")
        if len(buf) != BLOCK:
            raise _HeaderError("truncated", "truncated header")
        if buf.count(0) == BLOCK:
            raise _HeaderError("eof", "end of file header")
        chksum = _nti(buf[148:156])
        unsigned = 256 + sum(buf) - sum(buf[148:156])
        if chksum != unsigned:
            signed = unsigned - 256 * (sum(1 for c in buf[:148] if c > 127) + sum(1 for c in buf[156:] if c > 127))
            if chksum != signed:
                raise _HeaderError("invalid", "bad checksum")
        for lo, hi in ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345)):
            _nti(buf[lo:hi])  # mode, uid, gid, mtime, devmajor, devminor: tarfile refuses a bad number
        self.size = _nti(buf[124:136])
        self.type = buf[156:157]
        name = _nts(buf[0:100])
        if self.type == b"\0" and name.endswith("/"):
            self.type = b"5"
        if self.type == b"5":
            name = name.rstrip("/")
        prefix = _nts(buf[345:500])
        if prefix and self.type not in _GNU:
            name = prefix + "/" + name
        self.name = name


def _pax_records(buf: bytes, into: dict) -> None:
    pos = 0
    while True:
        m = _PAX_RECORD.match(buf, pos)
        if not m:
            return
        length = int(m.group(1))
        if length == 0:
            raise _HeaderError("invalid", "invalid header")
        keyword = m.group(2).decode("utf-8", "surrogateescape")
        into[keyword] = buf[m.end(2) + 1:m.start(1) + length - 1].decode("utf-8", "surrogateescape")
        pos += length


def _apply_pax(h: _Header, pax: dict) -> None:
    for k, v in pax.items():
        if k.startswith("GNU.sparse."):
            raise TarDamaged("GNU sparse members are not supported")
        if k not in _PAX_FIELDS:
            continue
        if k == "path":
            h.name = v.rstrip("/")
        elif k == "size":
            try:
                h.size = int(v)
            except ValueError:
                h.size = 0


def iter_tar_files(f, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes | None]]:
    """Yields (name, data) for each regular file of the tar stream ``f``, in file order.

    ``want(name)``, when given, is asked before a member's data is read: for False the data is skipped
    (seeked over when ``f`` can seek, else read and dropped) and ``None`` is yielded in its place."""
    end = None  # the stream's length, when it can seek: a skipped member past it is cut short
    if want is not None:
        try:
            if f.seekable():
                here = f.tell()
                end = f.seek(0, 2)
                f.seek(here)
        except (AttributeError, OSError, ValueError):
            end = None
    glob: dict = {}  # pax global headers: apply to every later member
    offset = 0  # where the current member's first header starts
    while True:
        subsequent = False
        overrides: list[tuple[bytes, object]] = []  # (kind, value) from L / x headers, outermost first
        try:
            while True:
                h = _Header(_read(f, BLOCK))
                if h.size < 0 or h.size > MAX_MEMBER:
                    raise TarDamaged(f"member {h.name!r} declares {h.size} bytes")
                if h.type in (b"L", b"K"):
                    buf = _read(f, _block(h.size))
                    if len(buf) < _block(h.size):
                        raise TarDamaged("unexpected end of data in a GNU long name")
                    overrides.append((h.type, _nts(buf)))
                    subsequent = True
                    continue
                if h.type in (b"x", b"g", b"X"):
                    buf = _read(f, _block(h.size))
                    if h.type == b"g":
                        _pax_records(buf, glob)
                    else:
                        local = dict(glob)
                        _pax_records(buf, local)
                        overrides.append((b"x", local))
                    if len(buf) < _block(h.size):
                        raise TarDamaged("unexpected end of data in a pax header")
                    subsequent = True
                    continue
                if h.type == b"S":
                    raise TarDamaged("GNU sparse members are not supported")
                break
        except _HeaderError as e:
            if subsequent:  # the header after a long name or pax header: tarfile raises
                raise TarDamaged(str(e)) from None
            if e.kind == "eof" or offset != 0:
                return  # tarfile: the end marker, or a later header cut short or corrupt, ends the archive
            raise TarDamaged("empty file" if e.kind == "empty" else str(e)) from None
        _apply_pax(h, glob)
        for kind, value in reversed(overrides):  # the innermost applies first, the outermost wins
            if kind == b"L":
                h.name = value.removesuffix("/") if h.type == b"5" else value
            elif kind == b"x":
                _apply_pax(h, value)
        if h.size < 0 or h.size > MAX_MEMBER:  # again: a pax record may set it
            raise TarDamaged(f"member {h.name!r} declares {h.size} bytes")
        has_data = h.type in _REGULAR or h.type not in _SUPPORTED
        size = h.size if has_data else 0
        pad = _block(size) - size
        if h.type in _REGULAR:
            if want is not None and not want(h.name):
                data = None
                if end is not None:
                    if f.seek(size, 1) > end:
                        raise TarDamaged(f"unexpected end of data in {h.name!r}")
                else:
                    left = size
                    while left > 0 and (n := len(_read(f, min(left, 1 << 20)))):
                        left -= n
                    if left:
                        raise TarDamaged(f"unexpected end of data in {h.name!r}")
            else:
                data = _read(f, size)
                if len(data) < size:
                    raise TarDamaged(f"unexpected end of data ({len(data)} of {size} bytes of {h.name!r})")
            yield h.name, data
            if pad and len(_read(f, pad)) < pad:
                raise TarDamaged("unexpected end of data")
        elif size + pad:
            if len(_read(f, size + pad)) < size + pad:
                raise TarDamaged("unexpected end of data")
        offset = 1  # past the first member: later header errors end the archive quietly
