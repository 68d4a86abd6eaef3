"""Which shards make a dataset: ``dataset.json`` (checked against its schema) or a shard pattern / URL.

Trust: a dataset file is read, never believed. Its schema is checked before anything else uses it, and it
can only name shard *files*:

- a relative path must stay inside the split folder (no ``..`` component, no drive or root): a dataset
  copied between machines cannot reach out of its folder by accident or by design;
- an absolute path is allowed, for shards indexed in place (a dataset file written next to shards kept
  elsewhere): the path is written out in full in the file, so a reader sees where it points, and it is
  only ever opened for reading as a tar of plain files;
- never a ``pipe:`` command or a URL: those would run a command or reach a server that the file chose.
  They come only from the config or the command line (``data.train='pipe:aws s3 cp s3://b/x-{0..9}.tar -'``),
  which the user wrote;
- every shard records its ``size``, checked against the file when the dataset is resolved (a cut-short or
  replaced shard is reported before training starts; the samples it cannot deliver then count as bad,
  bounded by ``data.max_bad_fraction``); ``sha256``, when recorded, is checked with
  ``resolve_dataset(..., verify="sha256")`` (it reads every byte: ``stackgan prepare`` output is checked so
  in tests, and a user can ask for it);
- sample counts are bounded (at most one sample per 1 KiB of shard: two tar headers at least), so a
  hostile count cannot make the loader loop or allocate without end.

Shards kept in an object store: ``data.shard_url`` (config or command line) is a template applied to each
shard the file names, ``{name}`` its path as written in the file, ``{path}`` its local path
(``pipe:aws s3 cp s3://bucket/{name} -``). The file's text is quoted into the template (``shlex.quote`` for
a ``pipe:`` command, URL quoting for a URL), so a hostile name cannot add a shell command. A stream has no
size to stat: with ``verify="size"`` the recorded sizes are not checked on it (a stream cut short still
shows, as fewer samples than the file records, when the loader reads it); ``verify="sha256"`` reads every
stream through and checks both its byte count and its hash.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

from ...errors import DataError
from ...safety.budgets import OverBudget, read_npy
from ...safety.files import open_regular, require_regular
from ..format import (CAPTION_KEYS, DATASET_FORMAT, DATASET_VERSION, IMAGE_KEYS, MANIFEST, MAX_CAPTIONS,
                      MAX_SAMPLES, MAX_TEXT_DIM, REQUIRED, sha256_file)
from .decode import check_sample
from .samples import iter_samples

log = logging.getLogger("stackgan_dist.data")
ENCODERS = ("precomputed", "hashing", "sentence-transformers")
# indexed shards: where their captions are embedded -> the encoder that does it
EMBED_ON = {"worker": "hashing", "device": "sentence-transformers"}
_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass
class Shard:
    url: str
    samples: int
    size: int | None = None
    sha256: str | None = None


@dataclass
class DatasetInfo:
    shards: list[Shard]
    num_samples: int
    text_dim: int
    manifest: dict
    root: str
    source: str = ""  # the dataset file (or the shard pattern) it came from, for messages


def is_remote(url: str) -> bool:
    """A ``pipe:`` command or a URL: allowed from the config or command line only."""
    return url.startswith("pipe:") or "://" in url


def expand_braces(pattern: str) -> list[str]:
    """Brace patterns (``shard-{000000..000009}.tar``) and, for local paths, glob wildcards."""
    import glob

    import braceexpand  # installed with webdataset

    out = []
    for u in braceexpand.braceexpand(pattern):
        if not is_remote(u) and any(c in u for c in "*?["):
            out += sorted(glob.glob(u))
        else:
            out.append(u)
    return out


def _int(v, where: str, lo: int = 0, hi: int = MAX_SAMPLES) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where} must be an integer, got {type(v).__name__} {_short(v)}")
    if not lo <= v <= hi:
        raise ValueError(f"{where} must lie in [{lo}, {hi}], got {v}")
    return v


def _str(v, where: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{where} must be a string, got {type(v).__name__} {_short(v)}")
    return v


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def shard_path(path: str, root: str, where: str) -> str:
    """The file a dataset file's shard entry names (see the module docstring for the rules)."""
    if not path or "\0" in path:
        raise ValueError(f"{where} must be a non-empty file path")
    if is_remote(path):
        raise ValueError(f"{where} is {_short(path)}: a dataset file names shard files only, never a pipe: "
                         "command or a URL (put those in data.shard_url, or data.train / eval's --data, which you write "
                         "yourself)")
    if os.path.isabs(path):
        return os.path.normpath(path)
    parts = re.split(r"[/\\]", path)
    if ".." in parts or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"{where} is {_short(path)}, which leaves the split folder: name shards inside it, "
                         "or by their absolute path for shards indexed in place")
    return os.path.join(root, os.path.normpath(path))


def validate_manifest(m, root: str) -> tuple[list[Shard], int, int]:
    """Schema of a dataset file -> (shards, num_samples, text_dim). Raises ValueError naming the field."""
    if not isinstance(m, dict):
        raise ValueError(f"the file must hold a JSON object, got {type(m).__name__}")
    if m.get("format") != DATASET_FORMAT:
        raise ValueError(f"'format' must be {DATASET_FORMAT!r}, got {_short(m.get('format'))}")
    version = _int(m.get("version"), "'version'", 1, 1 << 30)
    if version > DATASET_VERSION:
        raise ValueError(f"'version' {version} is newer than this stackgan_dist reads ({DATASET_VERSION}): "
                         "upgrade stackgan_dist, or prepare the data again")
    text_dim = _int(m.get("text_dim"), "'text_dim'", 1, MAX_TEXT_DIM)
    enc = m.get("text_encoder")
    if not isinstance(enc, dict):
        raise ValueError(f"'text_encoder' must be an object, got {_short(enc)}")
    if enc.get("name") not in ENCODERS:
        raise ValueError(f"'text_encoder.name' must be one of {list(ENCODERS)}, got {_short(enc.get('name'))}")
    if _int(enc.get("dim"), "'text_encoder.dim'", 1, MAX_TEXT_DIM) != text_dim:
        raise ValueError(f"'text_encoder.dim' {enc['dim']} differs from 'text_dim' {text_dim}")
    for k in ("path", "source"):
        if k in enc:
            _str(enc[k], f"'text_encoder.{k}'")
    for k in ("image_size",):
        if k in m:
            _int(m[k], f"'{k}'", 1, 1 << 16)
    for k in ("source", "created"):
        if k in m:
            _str(m[k], f"'{k}'")
    idx = m.get("index")
    if idx is not None:  # shards indexed in place, captions embedded on the fly (stackgan prepare index)
        if not isinstance(idx, dict):
            raise ValueError(f"'index' must be an object, got {_short(idx)}")
        keys = idx.get("image_keys")
        if not isinstance(keys, list) or not keys or not all(k in IMAGE_KEYS for k in keys):
            raise ValueError(f"'index.image_keys' must be a non-empty list of {list(IMAGE_KEYS)}, got {_short(keys)}")
        if idx.get("caption_key") not in CAPTION_KEYS:
            raise ValueError(f"'index.caption_key' must be one of {list(CAPTION_KEYS)}, got "
                             f"{_short(idx.get('caption_key'))}")
        embed_on = idx.get("embed_on", "worker")  # files written before the key: the hashing encoder
        want = EMBED_ON.get(embed_on) if isinstance(embed_on, str) else None
        if want is None:
            raise ValueError(f"'index.embed_on' must be one of {list(EMBED_ON)}, got {_short(embed_on)}")
        if enc.get("name") != want:
            raise ValueError(f"an indexed dataset with 'index.embed_on' {embed_on!r} embeds captions with the {want}"
                             f" encoder; 'text_encoder.name' is {_short(enc.get('name'))}")
    entries = m.get("shards")
    if not isinstance(entries, list):
        raise ValueError(f"'shards' must be a list, got {_short(entries)}")
    shards = []
    for i, s in enumerate(entries):
        where = f"'shards[{i}]"
        if not isinstance(s, dict):
            raise ValueError(f"{where}' must be an object with path, samples and size, got {_short(s)}")
        url = shard_path(_str(s.get("path"), f"{where}.path'"), root, f"{where}.path'")
        size = _int(s.get("size"), f"{where}.size'", 0, 1 << 50)
        samples = _int(s.get("samples"), f"{where}.samples'", 0, size // 1024)
        sha = s.get("sha256")
        if sha is not None and not (isinstance(sha, str) and _SHA.fullmatch(sha)):
            raise ValueError(f"{where}.sha256' must be 64 lowercase hex digits, got {_short(sha)}")
        shards.append(Shard(url, samples, size, sha))
    n = _int(m.get("num_samples"), "'num_samples'")
    if n != sum(s.samples for s in shards):
        raise ValueError(f"'num_samples' {n} differs from the sum of the shards' samples "
                         f"{sum(s.samples for s in shards)}")
    return shards, n, text_dim


def utf8_text(raw: bytes, path: str, advice: str) -> str:
    """``raw`` as UTF-8 (a BOM allowed), else one DataError line naming the file, the line and the byte;
    ``advice`` ends the byte's parenthesis and says what to do."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}{advice}") from None


def read_manifest(path: str) -> dict:
    """A dataset file's JSON (UTF-8, a BOM allowed); DataError naming the file (and line) otherwise."""
    try:
        with open_regular(path, "dataset file") as f:
            raw = f.read(64 << 20)
            if f.read(1):
                raise DataError(f"{path}: larger than 64 MiB; not a dataset file")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    text = utf8_text(raw, path, "); a dataset file is UTF-8 JSON (write it again with `stackgan prepare`)")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); write it again with "
                        "`stackgan prepare`") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e) or type(e).__name__})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def load_manifest(path: str, verify: str = "size", shard_url: str = "") -> DatasetInfo:
    m = read_manifest(path)
    root = os.path.dirname(os.path.abspath(path))
    try:
        shards, n, text_dim = validate_manifest(m, root)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    if shard_url:
        for s, entry in zip(shards, m["shards"]):
            s.url = shard_from_template(shard_url, entry["path"], s.url)
        if verify == "size":
            log.info("data.shard_url: the shard sizes %s records cannot be checked on a stream without reading "
                     "it (a shorter stream shows as missing samples when read)", path)
    for s in shards:
        if shard_url:
            check_stream(s, path, verify)
        else:
            check_shard(s, path, verify)
    return DatasetInfo(shards, n, text_dim, m, root, path)


def shard_from_template(template: str, name: str, path: str) -> str:
    """``data.shard_url`` with one shard's ``{name}`` (as the dataset file writes it) and ``{path}`` (its
    local path) quoted in: shell quoting in a ``pipe:`` command, URL quoting in a URL (the file is hostile)."""
    if template.startswith("pipe:"):
        import shlex

        q = shlex.quote
    else:
        from urllib.parse import quote

        q = lambda v: quote(v, safe="/")  # noqa: E731
    return template.replace("{name}", q(name)).replace("{path}", q(path))


def check_stream(s: Shard, manifest: str, verify: str = "size") -> None:
    """A templated shard (a stream): with verify="sha256", read it through and check its size and hash."""
    if verify != "sha256":
        return
    import hashlib

    from .samples import open_url

    h, size = hashlib.sha256(), 0
    try:
        f = open_url(s.url)
        try:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        finally:
            f.close()
    except Exception as e:  # noqa: BLE001 -- a failing command or server: one line naming the shard
        raise DataError(f"cannot read shard {s.url} ({type(e).__name__}: {e}); check data.shard_url") from None
    if s.size is not None and size != s.size:
        raise DataError(f"shard {s.url} streamed {size} bytes, {manifest} records {s.size} (check data.shard_url, "
                        "or prepare the split again)")
    if s.sha256 and h.hexdigest() != s.sha256:
        raise DataError(f"shard {s.url} does not match the sha256 that {manifest} records (prepare it again)")


def check_shard(s: Shard, manifest: str, verify: str = "size") -> None:
    """The shard file exists and has the recorded size (and hash, for verify="sha256")."""
    if not os.path.lexists(s.url):
        raise DataError(f"shard listed in {manifest} is missing: {s.url}")
    size = require_regular(s.url, f"shard listed in {manifest},").st_size
    if s.size is not None and size != s.size:  # samples it cannot deliver count as bad (data.max_bad_fraction)
        log.warning("shard %s has %d bytes, %s records %d: it was cut short or replaced (prepare the split "
                    "again); samples it cannot deliver count as bad", s.url, size, manifest, s.size)
    if verify == "sha256" and s.sha256 and sha256_file(s.url) != s.sha256:
        raise DataError(f"shard {s.url} does not match the sha256 that {manifest} records (prepare it again)")


def _count_samples(url: str) -> int:
    n = 0
    try:
        for _ in iter_samples(url, keep=lambda i: False):  # member data is skipped: headers only
            n += 1
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged shard: keep what it delivers
        log.warning("shard %s unreadable after %d samples (%s: %s); using those", url, n, type(e).__name__, e)
        return max(0, n - 1)  # the last key may be partial
    return n


def resolve_dataset(spec: str, verify: str = "size", shard_url: str = "", key: str = "--data") -> DatasetInfo:
    """``spec``: a split directory holding dataset.json, a dataset.json path, or a shard pattern / URL
    (local, ``shard-{000000..000009}.tar``, ``pipe:CMD``) from the config or command line. ``shard_url``:
    where a dataset file's shards are read from (data.shard_url, see the module docstring). ``key``: what
    set ``spec`` (a config key such as data.train, or a flag), named in the messages.
    Raises DataError before any worker starts."""
    if verify not in ("size", "sha256"):
        raise ValueError(f"verify must be 'size' or 'sha256', got {verify!r}")
    if not spec:
        raise DataError(f"no data path given: set {key}")
    if os.path.isdir(spec):
        mpath = os.path.join(spec, MANIFEST)
        if not os.path.lexists(mpath):
            raise DataError(f"data directory {spec} ({key}) has no {MANIFEST} (prepare it with `stackgan prepare`)")
        return load_manifest(mpath, verify, shard_url)
    if spec.endswith(".json") and not is_remote(spec):
        if not os.path.lexists(spec):
            raise DataError(f"data manifest not found: {spec} ({key})")
        return load_manifest(spec, verify, shard_url)
    if not is_remote(spec) and not any(c in spec for c in "{*?[") and not os.path.exists(spec):
        raise DataError(f"{key} {spec} does not exist: prepare a dataset there (`stackgan prepare ... --out`) or "
                        f"point {key} at one")
    if shard_url:
        raise DataError(f"data.shard_url applies to the shards a {MANIFEST} names; {key}={spec} is a shard pattern "
                        "(write the pipe: command or URL in the pattern itself, or index the shards with "
                        "`stackgan prepare index`)")
    # a pattern from the config: expand, check, count (a neighbouring dataset.json avoids the count pass)
    urls = expand_braces(spec)
    if not urls:
        raise DataError(f"shard pattern {spec} ({key}) matches nothing")
    for u in urls:
        if not is_remote(u):
            if not os.path.lexists(u):
                raise DataError(f"shard not found: {u} ({key}={spec})")
            require_regular(u, f"shard ({key}={spec})")
    shards = [Shard(u, _count_samples(u)) for u in urls]
    first = next(iter_samples(shards[0].url), None)
    if first is None:
        raise DataError(f"shard {urls[0]} holds no samples")
    if any(k not in first for k in REQUIRED):  # not a KeyError: a DataError naming shard, key, expected, found
        check_sample(first, 0)
    try:
        text_dim = int(read_npy(first["emb.npy"], None, MAX_CAPTIONS).shape[-1])
    except OverBudget as e:
        raise DataError(f"shard {urls[0]}: sample '{first['__key__']}' emb.npy {e}") from None
    if not 1 <= text_dim <= MAX_TEXT_DIM:
        raise DataError(f"shard {urls[0]}: sample '{first['__key__']}' has a {text_dim}-d embedding")
    return DatasetInfo(shards, sum(s.samples for s in shards), text_dim, {}, os.path.dirname(urls[0]), spec)

