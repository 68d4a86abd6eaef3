"""The hand-written tar reader equals tarfile's stream mode on random archives (ustar, GNU long names, pax
local and global headers), whole or cut at any byte: same members, same bytes, an error exactly where
tarfile raises one. It stays in the loader only while this holds (and benchmarks/dataloader.py shows it
faster)."""
import io
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stackgan_dist.data.read.tar_reader import TarDamaged, iter_tar_files

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
_component = st.text(st.sampled_from("abcXYZ019._-é漢"), min_size=1, max_size=40).filter(
    lambda s: s not in (".", ".."))
_name = st.lists(_component, min_size=1, max_size=7).map("/".join)
_pax_key = st.text(st.sampled_from("abcdefgz."), min_size=1, max_size=12).filter(lambda k: not k.startswith("GNU."))
_pax = st.dictionaries(_pax_key, st.text(st.sampled_from("xyz é=\n1"), max_size=30), max_size=3)
_member = st.tuples(st.sampled_from(["file", "file", "file", "dir", "symlink"]), _name,
                    st.binary(max_size=1500), _pax)


@st.composite
def archives(draw):
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    members = draw(st.lists(_member, max_size=6))
    glob = draw(_pax) if fmt == "pax" else {}
    buf = io.BytesIO()
    kw = {"pax_headers": glob} if glob else {}
    with tarfile.open(fileobj=buf, mode="w", format=FORMATS[fmt], **kw) as t:
        for kind, name, data, pax in members:
            ti = tarfile.TarInfo(name)
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, name + "-target"
            else:
                ti.size = len(data)
            if fmt == "pax":
                ti.pax_headers = pax
            try:
                t.addfile(ti, io.BytesIO(data) if kind == "file" else None)
            except ValueError:  # a name that this format cannot hold (e.g. ustar past 255 bytes)
                pass
    raw = buf.getvalue()
    cut = draw(st.one_of(st.just(len(raw)), st.integers(0, len(raw))))
    return raw[:cut]


def reference(raw: bytes):
    out = []
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as t:
            for m in t:
                if m.isreg():
                    out.append((m.name, t.extractfile(m).read()))
    except tarfile.ReadError:
        return out, True
    return out, False


class _Pipe(io.RawIOBase):
    """A stream that cannot seek and returns short reads, like a pipe."""

    def __init__(self, raw: bytes):
        self.b = io.BytesIO(raw)

    def readable(self):
        return True

    def read(self, n=-1):
        return self.b.read(n if n is None or n < 0 else min(n, 700))


def ours(f, want=None):
    out = []
    try:
        for name, data in iter_tar_files(f, want):
            out.append((name, data))
    except TarDamaged:
        return out, True
    return out, False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives())
def test_equals_tarfile_on_random_archives(raw):
    ref = reference(raw)
    assert ours(io.BytesIO(raw)) == ref
    assert ours(_Pipe(raw)) == ref


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives(), st.integers(0, 3))
def test_skipping_members_keeps_names_and_errors(raw, mod):
    """Members not wanted are skipped (seeked over, or read and dropped on a pipe): same names, same errors."""
    ref_members, ref_err = reference(raw)

    def want(name):
        return hash(name) % 4 != mod

    expect = [(n, d if want(n) else None) for n, d in ref_members]
    for f in (io.BytesIO(raw), _Pipe(raw)):
        assert ours(f, want) == (expect, ref_err)


def test_hostile_headers_are_refused_not_allocated():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("a.jpg")
        ti.size = 3
        ti.pax_headers = {"size": str(1 << 40)}  # 1 TiB claimed by a pax record
        t.addfile(ti, io.BytesIO(b"abc"))
    with pytest.raises(TarDamaged, match="declares"):
        list(iter_tar_files(io.BytesIO(buf.getvalue())))
    with pytest.raises(TarDamaged, match="empty file"):
        list(iter_tar_files(io.BytesIO(b"")))
    with pytest.raises(TarDamaged, match="checksum"):
        list(iter_tar_files(io.BytesIO(b"a" + bytes(511))))
