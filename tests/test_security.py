"""Hostile files: crafted pickles, tampered checkpoints and engine files, weights read twice.

Every hostile file is generated here, by code. A crafted file either loads as plain data or is refused with
one clear error: it never runs code, never crashes the interpreter (segfault, C stack overflow) and never
makes a small file allocate gigabytes. Loads that could crash run in a subprocess under an address-space
limit, so a crash is a failed test, not a dead test session.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PY, REPO
from stackgan_dist.safety.unpickle import ALLOWED, UnsafePickle, safe_loads

# -- crafted pickles, each allowed name used in a hostile way ------------------------------------------
_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_NUMERIC = np._core.numeric if hasattr(np, "_core") else np.core.numeric


class R:
    """Pickles as ``fn(*args)`` (+ BUILD ``state``): any call of an allowed name with any arguments."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _dtype(code, state):
    return R(np.dtype, (code, False, True), state)


def _array(dt, raw, shape=(1,)):
    return R(_MULTIARRAY._reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dt, False, raw))


OBJ_FIELD = {"a": (np.dtype("O"), 0)}
# flags 61: "holds object pointers" without "pickled as a list", so the array's raw bytes become pointers
HOSTILE_DTYPES = {
    "void_with_object_field": _dtype("V8", (3, "|", None, ("a",), OBJ_FIELD, 8, 1, 61)),
    "int_state_with_fields": _dtype("i8", (3, "|", None, ("a",), OBJ_FIELD, 8, 1, 61)),
    "int_state_with_object_flags": _dtype("i8", (3, "<", None, None, None, -1, -1, 61)),
    "float_state_with_subarray": _dtype("f4", (3, "<", (np.dtype("O"), (2,)), None, None, 16, 8, 61)),
    "object_dtype": _dtype("O8", (3, "|", None, None, None, -1, -1, 63)),
}
POINTERS = b"AAAAAAAA"  # 0x4141414141414141: touching it as a PyObject* segfaults


def _deep(n=300_000) -> bytes:
    """EMPTY_TUPLE then n x TUPLE1: a tuple nested n deep in about n bytes (hashing it overflows the C stack)."""
    return b")" + b"\x85" * n


def _long(n: int) -> bytes:
    b = n.to_bytes((n.bit_length() + 8) // 8, "little")
    return b"\x8a" + bytes([len(b)]) + b


CRAFTED = {
    **{f"array_of_{k}": (pickle.dumps(_array(dt, POINTERS), protocol=2), "only plain")
       for k, dt in HOSTILE_DTYPES.items()},
    **{f"scalar_of_{k}": (pickle.dumps(R(_MULTIARRAY.scalar, (dt, POINTERS)), protocol=2), "only plain")
       for k, dt in HOSTILE_DTYPES.items()},
    "frombuffer_object_dtype": (pickle.dumps(R(_NUMERIC._frombuffer, (bytearray(POINTERS),
                                                                       HOSTILE_DTYPES["void_with_object_field"],
                                                                       (1,), "C")), protocol=2), "only plain"),
    "legit_object_array": (pickle.dumps(np.array([1, "x"], dtype=object), protocol=2), "only plain"),
    "array_shape_asks_10GB": (pickle.dumps(_array(np.dtype("f4"), b"AAAA", (2_500_000_000,)), protocol=2),
                              "needs 10000000000 bytes"),
    "reconstruct_asks_10GB": (pickle.dumps(R(_MULTIARRAY._reconstruct, (np.ndarray, (10**10,), b"b")), protocol=2),
                              "_reconstruct arguments"),
    "reconstruct_other_subtype": (pickle.dumps(R(_MULTIARRAY._reconstruct, (list, (0,), b"b")), protocol=2),
                                  "_reconstruct arguments"),
    "frombuffer_asks_8GB": (pickle.dumps(R(_NUMERIC._frombuffer, (bytearray(8), np.dtype("f8"), (10**9,), "C")),
                                         protocol=2), "needs 8000000000 bytes"),
    "scalar_short_data": (pickle.dumps(R(_MULTIARRAY.scalar, (np.dtype("f8"), b"AA")), protocol=2), "needs 8 bytes"),
    # numpy.ndarray.__new__(ndarray, (10**10,)) through NEWOBJ: a 36-byte file asking for 80 GB
    "ndarray_newobj_asks_80GB": (b"\x80\x02cnumpy\nndarray\n" + _long(10**10) + b"\x85\x85\x81.", "NEWOBJ"),
    "bytearray_asks_10GB": (b"\x80\x02c__builtin__\nbytearray\n" + _long(10**10) + b"\x85R.", "asking for memory"),
    "bytes_asks_10GB": (b"\x80\x02c__builtin__\nbytes\n" + _long(10**10) + b"\x85R.", "asking for memory"),
    "binbytes8_asks_10GB": (b"\x80\x04\x8e" + struct.pack("<Q", 10**10) + b"x" * 8 + b".", "not a readable"),
    "codecs_other_codec": (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.",
                           "only latin1"),
    "str_of_a_list": (b"\x80\x02c__builtin__\nstr\n]\x85R.", "refused str()"),
    "deep_tuple_dict_key": (b"\x80\x02}" + _deep() + b"K\x01s.", "nested deeper"),
    "deep_tuple_dict_opcode": (b"(" + _deep() + b"K\x01d.", "nested deeper"),
    "deep_tuple_set_member": (b"\x80\x04\x8f(" + _deep() + b"\x90.", "nested deeper"),
    "deep_tuple_frozenset": (b"\x80\x04(" + _deep() + b"\x91.", "nested deeper"),
    "deep_tuple_via_dict_builtin": (b"\x80\x02c__builtin__\ndict\n]" + _deep() + b"K\x01\x86a\x85R.", "nested deeper"),
    "deep_tuple_via_set_builtin": (b"\x80\x02c__builtin__\nset\n]" + _deep() + b"a\x85R.", "nested deeper"),
    "build_on_a_list": (b"\x80\x02]}b.", "BUILD"),
    "os_system": (b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00trueR\x85R.", "refused to load global 'posix.system'"),
}

HARNESS = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a 10 GB request cannot quietly succeed
from stackgan_dist.safety.unpickle import safe_load
from stackgan_dist.errors import DataError
try:
    obj = safe_load(sys.argv[1])
except DataError as e:
    print("REFUSED", e)
    sys.exit(0)
print("LOADED", repr(obj)[:300])  # touches every element (object pointers included)
"""


def _load_isolated(path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([PY, "-c", HARNESS, str(path)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_pickle_is_refused_without_crash(tmp_path, name):
    data, why = CRAFTED[name]
    assert len(data) < 400_000
    f = tmp_path / f"{name}.pickle"
    f.write_bytes(data)
    p = _load_isolated(f)
    assert p.returncode == 0, f"{name}: exit {p.returncode} (a crash)\n{p.stdout[-1000:]}\n{p.stderr[-2000:]}"
    assert p.stdout.startswith("REFUSED "), f"{name}: {p.stdout[-1000:]}"
    assert str(f) in p.stdout and why in p.stdout, p.stdout
    assert len(p.stdout.strip().splitlines()) == 1


def test_small_pickles_asking_for_gigabytes_are_small():
    for name in ("ndarray_newobj_asks_80GB", "bytearray_asks_10GB", "bytes_asks_10GB", "binbytes8_asks_10GB"):
        assert len(CRAFTED[name][0]) <= 40, name


def test_only_constructors_of_plain_data_are_named():
    modules = {m for m, _ in ALLOWED}
    assert modules <= {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                       "numpy._core.numeric", "builtins", "__builtin__", "_codecs"}
    for m, n in ALLOWED:
        assert n in ("dtype", "ndarray", "_reconstruct", "scalar", "_frombuffer", "encode", "list", "tuple",
                     "dict", "set", "frozenset", "str", "unicode", "bytes", "bytearray", "int", "long", "float",
                     "bool", "complex"), (m, n)


# -- what the releases hold still loads, whatever the protocol -----------------------------------------
PLAIN_DTYPES = ["b1", "i1", "i2", "<i4", ">i4", "i8", "u1", "u2", "u4", "u8", "f2", "<f4", ">f4", "f8", "c8",
                "c16", "S5", "U3"]


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and \
            a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return type(a) is type(b) and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b


@st.composite
def arrays(draw):
    dt = np.dtype(draw(st.sampled_from(PLAIN_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    raw = draw(st.binary(min_size=int(np.prod(shape)) * dt.itemsize, max_size=int(np.prod(shape)) * dt.itemsize))
    a = np.frombuffer(raw, dtype=dt).reshape(shape).copy()
    return np.asfortranarray(a) if draw(st.booleans()) else a


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8), st.binary(max_size=8), st.complex_numbers(allow_nan=False))
keys = st.one_of(st.text(max_size=6), st.integers(-1000, 1000), st.tuples(st.integers(0, 9), st.text(max_size=3)))
release_like = st.recursive(
    st.one_of(scalars, arrays(), arrays().filter(lambda a: a.size > 0).map(lambda a: a.reshape(-1)[0])),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.tuples(kids, kids),
                           st.dictionaries(keys, kids, max_size=4)),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(release_like, st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_plain_data_loads_as_pickle_loads_it_at_every_protocol(obj, proto):
    data = pickle.dumps(obj, protocol=proto)
    assert _same(pickle.loads(data), safe_loads(data))


def _refused_or_plain(data: bytes) -> None:
    """The property: a load either returns plain data or raises UnsafePickle, nothing else."""
    try:
        out = safe_loads(data)
    except UnsafePickle as e:
        assert str(e) and "\n" not in str(e)
        return
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
            assert not x.dtype.hasobject and x.dtype.fields is None
            x.tobytes()
        else:
            assert isinstance(x, (str, bytes, bytearray, int, float, complex, bool, type(None), np.generic)), type(x)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash(data):
    _refused_or_plain(data)


SEEDS = [pickle.dumps(o, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1) for o in (
    {"names": ["001.Black_footed_Albatross/a_0001", "b"], "cls": [1, 2]},
    np.arange(12, dtype=np.float32).reshape(3, 4), [np.zeros(2, ">i4"), np.float64(2.5), (1, b"x", {3})],
    np.array(["ab", "c"]), frozenset({(1, "a"), 2.5}))]


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.sampled_from(["set", "insert", "delete", "cut"]),
                                                  st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                                        max_size=4))
def test_mutated_valid_pickles_never_crash(seed, edits):
    b = bytearray(seed)
    for op, pos, val in edits:
        pos %= max(len(b), 1)
        if op == "set" and b:
            b[pos] = val
        elif op == "insert":
            b.insert(pos, val)
        elif op == "delete" and b:
            del b[pos]
        elif op == "cut":
            del b[pos:]
    _refused_or_plain(bytes(b))


# -- checkpoint files -------------------------------------------------------------------------------
class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_manifest(ck, rel):
    """Recompute the manifest entry of ``rel``, as someone tampering with a checkpoint would."""
    from stackgan_dist.checkpoint.manager import sha256_file

    mpath = os.path.join(ck, "manifest.json")
    man = json.load(open(mpath))
    fp = os.path.join(ck, rel)
    man["files"][rel] = {"size": os.path.getsize(fp), "sha256": sha256_file(fp)}
    json.dump(man, open(mpath, "w"))


def test_tampered_model_file_with_recomputed_manifest_runs_no_code(tmp_path):
    import torch

    from stackgan_dist.checkpoint.manager import CheckpointManager, load_file, verify
    from stackgan_dist.distributed.env import DistEnv
    from stackgan_dist.errors import CheckpointError

    mgr = CheckpointManager(str(tmp_path), DistEnv())
    ck = mgr.save(1, {"G": {"w": torch.zeros(2)}, "D": {"w": torch.ones(2)}, "step": 1}, {"rank": 0})
    marker = tmp_path / "pwned"
    torch.save({"G": {"w": torch.zeros(2)}, "evil": _Boom(marker)}, os.path.join(ck, "model.pt"))
    _rewrite_manifest(ck, "model.pt")
    assert verify(ck) == (True, "ok")  # the hashes match: only the loader stands between the file and a shell
    with pytest.raises(CheckpointError, match=r"refused to load checkpoint file .*model\.pt: Weights only load"):
        load_file(os.path.join(ck, "model.pt"))
    assert not marker.exists()


# -- Inception weights: read once, weights only -------------------------------------------------------
def test_inception_weights_are_read_once_and_weights_only(tmp_path):
    """An audit hook counts every open() of the weights file: one read, which is the checked one (a second,
    unrestricted read by torch-fidelity could get a file swapped after the check)."""
    from stackgan_dist.evaluation.inception import build_inception, write_random_weights

    path = str(tmp_path / "inception.pth")
    write_random_weights(path, classes=10)
    opened = []
    target = os.path.realpath(path)

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            try:
                if os.path.realpath(os.fsdecode(args[0])) == target:
                    opened.append(args[1])
            except (TypeError, ValueError):
                pass

    sys.addaudithook(hook)  # cannot be removed; it only watches this test's temporary path
    net = build_inception(path)
    assert len(opened) == 1, opened
    assert net.num_classes == 10 and net.fc.weight.shape == (10, 2048)
    import torch

    sd = torch.load(path, weights_only=True)
    assert torch.equal(net.fc.weight, sd["fc.weight"])


# -- the release loader checks what the pickles hold ----------------------------------------------------
@pytest.mark.parametrize("file,obj,why", [
    ("filenames.pickle", ["jpg/image_00001", "../../../etc/secret"], "not a relative image name"),
    ("filenames.pickle", ["/etc/passwd"], "not a relative image name"),
    ("filenames.pickle", {"a": 1}, "expected a list of image names"),
    ("filenames.pickle", [1, 2], "not a relative image name"),
    ("class_info.pickle", ["x", "y"], "integer class ids"),
    ("char-CNN-RNN-embeddings.pickle", "text", "expected a numeric array"),
    ("char-CNN-RNN-embeddings.pickle", [[1.0, 2.0], [3.0]], "not a regular array"),
])
def test_release_pickles_of_the_wrong_shape_are_refused(tmp_path, file, obj, why):
    sys.path.insert(0, os.path.join(REPO, "tests", "assets"))
    from make_release import make_flowers

    from stackgan_dist.data.prepare.stackgan_release import load_split
    from stackgan_dist.errors import DataError

    root = str(tmp_path / "release")
    make_flowers(root, n_train=2, n_test=1)
    with open(os.path.join(root, "train", file), "wb") as f:
        pickle.dump(obj, f, protocol=2)
    with pytest.raises(DataError, match=why):
        load_split(root, "train")


# -- DeepSpeed engine files: weights only, whichever backend wrote the checkpoint ---------------------------
@pytest.mark.slow
def test_deepspeed_engine_files_resume_and_a_tampered_one_runs_no_code(synth_data, tmp_path):
    """A real one-process ZeRO-2 run (gloo, CPU) resumes through the weights-only engine loader; the same
    checkpoint with an engine file that would run code (manifest hashes recomputed) is refused, in one line."""
    import shutil

    import torch

    from conftest import CFG1, check, run_cli, tiny_overrides
    from stackgan_dist.distributed.deepspeed_files import load_engine_file

    o = ["train.backend=deepspeed", "train.zero_stage=2", "checkpoint.every_steps=2"]
    run = tmp_path / "run"
    check(run_cli("train", CFG1, *tiny_overrides(synth_data, run, 1, 2, o), timeout=600))
    tampered = tmp_path / "tampered"
    shutil.copytree(run, tampered, symlinks=True)
    p = check(run_cli("train", CFG1, *tiny_overrides(synth_data, run, 1, 3, o), timeout=600))
    assert "resumed from" in p.stdout and "step_00000002" in p.stdout

    ck = tampered / "checkpoints" / "step_00000002"
    rel = "engine/G/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    import deepspeed  # noqa: F401 -- its classes are what the engine file holds

    state = load_engine_file(str(ck / rel))
    marker = tmp_path / "pwned"
    state["evil"] = _Boom(marker)
    torch.save(state, ck / rel)
    _rewrite_manifest(str(ck), rel)
    p = run_cli("train", CFG1, *tiny_overrides(synth_data, tampered, 1, 3, o), timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    assert not marker.exists()
    err = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "refused to load DeepSpeed engine file" in err[0] and rel in err[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr


# -- submitit's result file (launch/submitit_job.py reads it from the job folder on shared storage) ----------

def test_submitit_result_file_is_read_as_plain_data_and_runs_no_code(tmp_path):
    """Written as submitit writes it (cloudpickle): a finished job's dict and a failed job's traceback load;
    a result whose value would run a command on loading is refused with one line naming the file, and the
    command does not run; a pickle that is not a (state, value) pair is refused."""
    import importlib.util

    from submitit.core.utils import cloudpickle_dump

    from stackgan_dist.errors import DataError

    spec = importlib.util.spec_from_file_location("submitit_job", os.path.join(REPO, "launch", "submitit_job.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    done = ("success", {"stopped": "max_steps", "step": 3})
    cloudpickle_dump(done, tmp_path / "a_result.pkl")
    assert job.read_result(str(tmp_path / "a_result.pkl")) == done
    failed = ("error", "Traceback (most recent call last):\n  ...\nValueError: bad")
    cloudpickle_dump(failed, tmp_path / "b_result.pkl")
    assert job.read_result(str(tmp_path / "b_result.pkl")) == failed

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cloudpickle_dump(("success", Evil()), tmp_path / "c_result.pkl")
    with pytest.raises(DataError) as e:
        job.read_result(str(tmp_path / "c_result.pkl"))
    assert "c_result.pkl" in str(e.value) and "refused to load global" in str(e.value)
    assert len(str(e.value).splitlines()) == 1 and not marker.exists()
    cloudpickle_dump(["success", 1, 2], tmp_path / "d_result.pkl")
    with pytest.raises(DataError, match="not a submitit result"):
        job.read_result(str(tmp_path / "d_result.pkl"))
