"""What CPU can show of the CUDA path's contracts: the device index each process takes, and that no source
names an index-less CUDA device (torch.cuda.set_device refuses one: the first GPU benchmark died on it)."""
import ast
import os

import pytest

from conftest import REPO
from stackgan_dist.distributed.device import cuda_index
from stackgan_dist.errors import UserError


def test_cuda_index_from_local_rank():
    assert cuda_index(None, 8) == 0 and cuda_index("", 8) == 0  # a plain process
    assert [cuda_index(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert cuda_index("3", 8) == 3 and cuda_index(" 2 ", 8) == 2  # LOCAL_RANK / SLURM_LOCALID strings
    assert cuda_index(3, 1) == 0  # one GPU bound per task (--gpus-per-task): every rank sees its own as 0
    assert cuda_index(5, 4) == 1
    for bad in ("x", "1.5", -1, "-2"):
        with pytest.raises(UserError, match="LOCAL_RANK"):
            cuda_index(bad, 4)
    with pytest.raises(UserError, match="no CUDA device is visible"):
        cuda_index(0, 0)


def _sources():
    for top in ("stackgan_dist", "benchmarks", "tests"):
        for d, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(d, f)


def _is(node, *names):
    return isinstance(node, ast.Attribute) and node.attr == names[-1] and (
        len(names) == 1 or _is(node.value, *names[:-1])) or isinstance(node, ast.Name) and names == (node.id,)


def test_no_source_uses_an_index_less_cuda_device():
    """``torch.device("cuda")`` / ``set_device("cuda")`` nowhere: every CUDA device is ``cuda:N``."""
    found = []
    for path in _sources():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for n in ast.walk(tree):
            if not isinstance(n, ast.Call) or not n.args:
                continue
            a = n.args[0]
            bare = isinstance(a, ast.Constant) and a.value == "cuda"
            if bare and len(n.args) == 1 and (_is(n.func, "torch", "device") or _is(n.func, "set_device")):
                found.append(f"{os.path.relpath(path, REPO)}:{n.lineno}")
            if _is(n.func, "set_device") and isinstance(a, ast.Call) and _is(a.func, "torch", "device") \
                    and len(a.args) == 1 and not (isinstance(a.args[0], ast.Constant) and ":" in str(a.args[0].value)):
                found.append(f"{os.path.relpath(path, REPO)}:{n.lineno} (set_device of a one-argument device)")
    assert not found, found


def test_throughput_benchmark_takes_the_indexed_device_of_its_local_rank(monkeypatch):
    """The wiring the first GPU run needs, on CPU: torch.cuda is replaced only where no GPU can answer
    (device count, set_device), and set_device must receive ``cuda:LOCAL_RANK``, never a bare "cuda"."""
    import sys

    import torch

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import throughput

    given = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: given.append(torch.device(d)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert throughput.bench_device("cuda") == torch.device("cuda", 1)
    assert given == [torch.device("cuda", 1)] and given[0].index == 1
    assert throughput.bench_device("cpu") == torch.device("cpu")
