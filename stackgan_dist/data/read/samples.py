"""Shards -> samples: contiguous tar members that share a key form one sample (webdataset's convention)."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from ...errors import DataError
from ...safety.files import open_regular
from .tar_reader import iter_tar_files


def open_url(url: str):
    """A local path (a regular file only: a FIFO would block), or a ``pipe:`` command / URL that the config
    named (webdataset's gopen)."""
    if not (url.startswith("pipe:") or "://" in url or url == "-"):
        return open_regular(url, "shard")
    import webdataset as wds

    return wds.gopen(url, "rb")


def split_name(name: str) -> tuple[str, str] | None:
    """``dir/KEY.SUFFIX.EXT`` -> (``dir/KEY``, ``SUFFIX.EXT``); None for names that are not sample files."""
    base = os.path.basename(name)
    if "." not in base or base.startswith("."):
        return None
    key, suffix = base.split(".", 1)
    return os.path.join(os.path.dirname(name), key), suffix


def iter_samples(url: str, keep: Callable[[int], bool] | None = None) -> Iterator[dict]:
    """The samples of one shard in file order: ``{"__key__", "__url__", SUFFIX: bytes, ...}``.

    ``keep(i)`` False: sample i's member data is skipped (seeked over where the stream can seek) and the
    sample comes as ``{"__key__", "__url__", "__skipped__": True}``, so that indices stay aligned.
    A key that reappears later in the tar (webdataset#140: non-contiguous members) is an error rather than
    a silent partial sample. Raises tarfile.ReadError (TarDamaged) on a damaged tar."""
    state = {"key": None, "index": -1, "keep": True}

    def want(name: str) -> bool:
        ks = split_name(name)
        if ks is None:
            return False
        if ks[0] != state["key"]:
            state["key"], state["index"] = ks[0], state["index"] + 1
            state["keep"] = keep(state["index"])
        return state["keep"]

    cur: dict | None = None
    seen: set[str] = set()
    stream = open_url(url)
    try:
        for name, data in iter_tar_files(stream, want if keep is not None else None):
            ks = split_name(name)
            if ks is None:
                continue
            key, suffix = ks
            if cur is not None and key != cur["__key__"]:
                yield cur
                cur = None
            if cur is None:
                if key in seen:
                    raise DataError(f"shard {url}: members of sample '{key}' are not contiguous")
                seen.add(key)
                cur = {"__key__": key, "__url__": url}
            if data is None:
                cur["__skipped__"] = True
            else:
                cur[suffix] = data
        if cur is not None:
            yield cur
    finally:
        stream.close()
