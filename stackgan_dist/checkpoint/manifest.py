"""The manifest of a checkpoint folder: what it lists, how it is checked, and the digests it records.

``manifest.json`` is written last by the commit protocol (``manager.py``); a folder counts as a checkpoint
only when its manifest is a regular file of bounded size, of a version we read, listing every file loading
reads with its size and sha256, and every listed file matches. Everything here treats the folder as hostile:
no link is followed, no special file is opened, nothing is read past its bound.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat

import torch

from ..errors import TransientError, UserError
from .files import open_read

STEP_RE = re.compile(r"^step_(\d{8,})$")
MANIFEST = "manifest.json"
# the layout of manifest.json (fields, file entries); a newer one is refused rather than half-understood
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    f = open_read(path, "checkpoint file")
    if f is None:
        raise FileNotFoundError(path)
    with f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def params_digest(*modules) -> str:
    """sha256 over every parameter and buffer, in sorted-name order, of the given modules' state dicts."""
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        sd = m if isinstance(m, dict) else m.state_dict()
        for name in sorted(sd):
            t = sd[name]
            if not isinstance(t, torch.Tensor):
                continue
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def all_finite(sd: dict) -> bool:
    return all(torch.isfinite(t).all() for t in sd.values() if isinstance(t, torch.Tensor) and t.is_floating_point())


def _safe_rel(rel) -> bool:
    """A manifest path: relative, inside the checkpoint folder, no '..', no empty parts."""
    return isinstance(rel, str) and 0 < len(rel) < 512 and not rel.startswith("/") and "\\" not in rel \
        and "\0" not in rel and all(part not in ("", ".", "..") for part in rel.split("/"))


def _loaded_on_disk(path: str) -> list[str]:
    """The files of a checkpoint folder that loading reads: model.pt, rank_*.pt and everything in engine/."""
    out = [n for n in ("model.pt",) if os.path.lexists(os.path.join(path, n))]
    out += [n for n in os.listdir(path) if n.startswith("rank_") and n.endswith(".pt")]
    eng = os.path.join(path, "engine")
    if os.path.isdir(eng) and not os.path.islink(eng):
        for dirpath, _dirs, fnames in os.walk(eng):
            out += [os.path.relpath(os.path.join(dirpath, f), path).replace(os.sep, "/") for f in fnames]
    elif os.path.lexists(eng):
        out.append("engine")
    return out


def check_manifest(man, folder: str = "") -> str | None:
    """What is wrong with a parsed manifest's shape, or None. Every file loading needs (model.pt and one
    rank file per rank of the world size it records) must be listed with an int size and a sha256."""
    if not isinstance(man, dict):
        return f"manifest is a JSON {type(man).__name__}, not an object"
    for key, low in (("version", 1), ("step", 0), ("world_size", 1)):
        v = man.get(key)
        if type(v) is not int or v < low:
            return f"manifest field '{key}' is missing or not an integer >= {low}"
    if man["version"] > MANIFEST_VERSION:
        return f"manifest version {man['version']} is newer than this stackgan_dist reads ({MANIFEST_VERSION})"
    files = man.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for rel, meta in files.items():
        if not _safe_rel(rel):
            return f"manifest names a path outside the checkpoint ({str(rel)[:80]!r})"
        if not isinstance(meta, dict) or type(meta.get("size")) is not int or meta["size"] < 0 \
                or not isinstance(meta.get("sha256"), str) or not _SHA256.match(meta["sha256"]):
            return f"manifest entry {rel!r} has no valid size and sha256"
    if man["world_size"] > len(files):
        return f"manifest records world size {man['world_size']} but lists only {len(files)} files"
    for rel in ["model.pt"] + [f"rank_{r:05d}.pt" for r in range(man["world_size"])]:
        if rel not in files:
            return f"manifest does not list {rel}, which loading needs"
    m = STEP_RE.match(os.path.basename(folder)) if folder else None
    if m and int(m.group(1)) != man["step"]:
        return f"manifest is for step {man['step']}, the folder is {os.path.basename(folder)}"
    return None


def verify(path: str) -> tuple[bool, str]:
    """-> (ok, reason); never raises. The manifest must be a regular file of bounded size holding a manifest
    of the right shape (``check_manifest``); every file it lists must be a regular file of its size and
    sha256; and every file that loading reads must be listed (an unlisted file would load unverified)."""
    mpath = os.path.join(path, MANIFEST)
    try:
        st = os.lstat(mpath)
        if not stat.S_ISREG(st.st_mode):
            return False, f"{mpath} is not a regular file"
        if st.st_size > MAX_MANIFEST_BYTES:
            return False, f"{mpath} is {st.st_size} bytes, larger than any manifest (corrupt)"
        with open_read(mpath, "manifest", MAX_MANIFEST_BYTES) or _missing(mpath) as f:
            man = json.loads(f.read())
    except FileNotFoundError:
        return False, f"{mpath} missing (incomplete checkpoint)"
    except (UserError, TransientError) as e:  # from files.py: wrong type, too large, unreadable
        return False, str(e)
    except (OSError, ValueError, RecursionError) as e:
        return False, f"{mpath} corrupt ({type(e).__name__}: {str(e)[:200]})"
    problem = check_manifest(man, path)
    if problem:
        return False, f"{mpath}: {problem} (corrupt)"
    files = man["files"]
    try:
        for rel, meta in files.items():
            fp = os.path.join(path, rel)
            try:
                fst = os.lstat(fp)
            except FileNotFoundError:
                return False, f"{fp} missing"
            if not stat.S_ISREG(fst.st_mode):
                return False, f"{fp} is not a regular file"
            if fst.st_size != meta["size"]:
                return False, f"{fp} size mismatch (manifest {meta['size']}, found {fst.st_size}): corrupt"
            if sha256_file(fp) != meta["sha256"]:
                return False, f"{fp} sha256 mismatch: corrupt"
        unlisted = [rel for rel in _loaded_on_disk(path) if rel not in files]
    except (UserError, TransientError) as e:  # from files.py: wrong type, too large, unreadable
        return False, str(e)
    except OSError as e:
        return False, f"{path} unreadable ({e.strerror or e})"
    if unlisted:
        return False, f"{os.path.join(path, unlisted[0])} is not in the manifest (added after the commit)"
    return True, "ok"


def read_manifest(path: str) -> dict:
    """The manifest of a folder ``verify`` accepted (call that first)."""
    mpath = os.path.join(path, MANIFEST)
    with open_read(mpath, "manifest", MAX_MANIFEST_BYTES) or _missing(mpath) as f:
        return json.loads(f.read())


def _missing(path: str):
    raise FileNotFoundError(path)
