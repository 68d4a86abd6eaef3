"""Form one process group from whatever launched us: torchrun, Slurm srun, Ray Train, or nothing."""
from __future__ import annotations

import datetime
import logging
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import process_end
from ..errors import UserError
from .collectives import all_reduce_max, barrier  # noqa: F401  (re-exported for callers of env)
from .device import local_cuda_device

log = logging.getLogger("stackgan_dist.distributed")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: str = "single"
    owns_group: bool = False  # we created the group (so we destroy it); Ray Train owns its own

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def slurm_master_addr(nodelist: str) -> str:
    """The first node's address as Slurm knows it (NodeAddr): node names need not resolve."""
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30, check=True).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]
    try:
        out = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True, timeout=30,
                             check=True).stdout
        m = re.search(r"NodeAddr=(\S+)", out)
        return m.group(1) if m else first
    except (OSError, subprocess.SubprocessError):
        return first


def detect_launcher() -> str:
    if dist.is_available() and dist.is_initialized():
        # launch_ray.py marks its workers; Ray Train formed (and owns) their group
        return "ray" if os.environ.get("STACKGAN_LAUNCHER") == "ray" else "external"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1 \
            and os.environ.get("SLURM_STEP_ID") is not None:
        return "slurm"
    return "single"


def granted_cpus(environ=os.environ, affinity: set | None = None) -> int:
    """CPUs this process may use: its CPU affinity (what cgroups / srun binding allow), and no more than
    Slurm's SLURM_CPUS_PER_TASK where that is set (without task binding the affinity can be the whole node)."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    n = max(1, len(affinity))
    try:
        slurm = int(environ.get("SLURM_CPUS_PER_TASK", ""))
    except ValueError:
        slurm = 0
    return min(n, slurm) if slurm > 0 else n


def auto_num_workers(cpus: int, cap: int = 16) -> int:
    """Loader workers for ``data.num_workers=auto``: one CPU stays with the training process, the rest decode
    (at most ``cap``); one CPU: the training process loads itself (0 workers). The data partition does not
    depend on the worker count, so this may differ between runs of one job."""
    return max(0, min(cpus - 1, cap))


def resolve_num_workers(configured: int) -> int:
    """``data.num_workers`` for this process: AUTO (-1) is resolved here, at start, on the node that runs."""
    return auto_num_workers(granted_cpus()) if configured < 0 else configured


def under_batch_system(environ=os.environ) -> bool:
    """Whether a Slurm job or a Ray worker runs us: their logs are files, not terminals."""
    return "SLURM_JOB_ID" in environ or environ.get("STACKGAN_LAUNCHER") == "ray" or "RAY_JOB_ID" in environ


def ranks_on_this_node(environ=os.environ) -> int:
    """How many ranks share this node, as the launcher says (torchrun LOCAL_WORLD_SIZE, Slurm's tasks per
    node: "8", "8(x2)" or "4,3", the first count being ours when SLURM_NODEID is 0); 1 when none says."""
    if environ.get("LOCAL_WORLD_SIZE", "").isdigit():
        return max(1, int(environ["LOCAL_WORLD_SIZE"]))
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or ""
    m = re.match(r"(\d+)", per_node)
    return max(1, int(m.group(1))) if m else 1


def unused_cuda_devices(device: torch.device, environ=os.environ) -> int:
    """CUDA devices this rank sees beyond one per rank on its node (0 on CPU): GPUs nobody uses, usually a job
    shape that starts fewer tasks than GPUs (sbatch --gpus-per-node=8 without --ntasks-per-node=8)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    return max(0, torch.cuda.device_count() - ranks_on_this_node(environ))


def set_backend_flags(deterministic: bool, device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions and cuDNN autotuning on CUDA, unless runs must be bitwise."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def planned_env(device: str = "auto", world_size: int | None = None, layout: str = "") -> DistEnv:
    """The layout a dry run checks: this process's (``probe_env``), or ``world_size`` ranks (``--nodes N
    --tasks-per-node T``, described by ``layout``) seen from rank 0, whose launcher is then "planned (LAYOUT)"
    (any launcher starts that layout). ``device="cuda"`` plans a CUDA run on a host without one (a login
    node): the device is then ``cuda:LOCAL_RANK`` unchecked, every other check runs."""
    env = probe_env(device if device != "cuda" or torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        env.device = torch.device("cuda", env.local_rank)
    if world_size is not None:
        env.rank, env.world_size, env.local_rank = 0, world_size, 0
        env.launcher = f"planned ({layout})" if layout else "planned"
    return env


def probe_env(device: str = "auto") -> DistEnv:
    """This process's rank, world size and device as ``init_distributed`` would find them, without forming a
    group (a dry run checks a start and writes nothing). WORLD_SIZE / SLURM_NTASKS alone (no rank) describe
    the layout a real start would have."""
    launcher = detect_launcher()
    if launcher == "slurm":
        rank, local = int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", "0"))
    else:
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    return DistEnv(rank, world, local, pick_device(device, local), launcher)


def pick_device(want: str, local_rank: int) -> torch.device:
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible")
    return local_cuda_device(local_rank)  # always cuda:N, made current


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", timeout_s: float = 120.0, startup_timeout_s: float | None = None,
                     need_group: bool = False) -> DistEnv:
    """The one place a process group is formed, for every backend.

    ``startup_timeout_s`` (default ``timeout_s``) bounds formation and every collective until
    ``set_collective_timeout`` lowers it after the first steps (ranks that compile at different speeds
    wait for each other there). ``need_group``: a group even for one process (DeepSpeed insists on one);
    it is private (a free local port) and torn down with the run.
    """
    startup = max(timeout_s, startup_timeout_s or 0.0)
    launcher = detect_launcher()
    if launcher in ("ray", "external"):
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistEnv(rank, world, local, pick_device(device, local), launcher, owns_group=False)
    if launcher == "single":
        rank, world, local = 0, 1, 0
    elif launcher == "torchrun":
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    else:  # slurm: one task per GPU (or CPU slot); rendezvous on the first node of the allocation
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local = int(os.environ.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = slurm_master_addr(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        if "MASTER_PORT" not in os.environ:
            job = int(os.environ.get("SLURM_JOB_ID", "0"))
            os.environ["MASTER_PORT"] = str(15000 + job % 17000)  # below Linux's ephemeral ports (32768+)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    dev = pick_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if world == 1:
        if not need_group:
            return DistEnv(rank, world, local, dev, launcher)
        # a private one-process group (DeepSpeed needs one); LOCAL_RANK too, which DeepSpeed's checks read
        os.environ.setdefault("LOCAL_RANK", str(local))
        dist.init_process_group(backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                timeout=datetime.timedelta(seconds=startup))
        return DistEnv(rank, world, local, dev, launcher, owns_group=True)
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "29500")
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                store=_store(addr, port, rank, world, timeout_s),
                                timeout=datetime.timedelta(seconds=startup))
        # a first collective proves the group formed (world size mismatches surface here, bounded by timeout)
        t = torch.ones(1, device=dev)
        dist.all_reduce(t)
        if int(t.item()) != world:
            raise RuntimeError(f"all-reduce over the group gave {int(t.item())}, expected world size {world}")
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"rank {rank}: process group ({backend}, {addr}:{port}, world size {world}) did not "
                        f"form within {timeout_s:.0f}s: {msg}") from None
    return DistEnv(rank, world, local, dev, launcher, owns_group=True)


def set_collective_timeout(env: DistEnv, timeout_s: float) -> bool:
    """Lowers the timeout of our group's collectives (after the startup steps). -> whether it was applied.
    Groups formed by someone else (Ray Train) keep theirs; so does a backend that cannot change it."""
    if not (env.owns_group and dist.is_initialized()):
        return False
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(datetime.timedelta(seconds=timeout_s))
        return True
    except (ImportError, RuntimeError, ValueError, AssertionError) as e:
        log.info("collective timeout stays at the startup value (%s)", e)
        return False


def _store(addr: str, port: str, rank: int, world: int, timeout_s: float):
    """The rendezvous store. Where torchrun's agent hosts it (its default), it outlives a restarted group
    and still holds the dead workers' gloo addresses, so it is namespaced by the restart count, as torch's
    own env:// rendezvous does; without that the new workers read stale addresses ("connection refused").
    Where rank 0 hosts it (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, or Slurm), every round gets a new store
    on a new port and one namespace: the agents of several nodes need not agree on a restart count (an
    agent restarted for a new node does not count it, one restarted for a failure does)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    store = dist.TCPStore(addr, int(port), world, is_master=(rank == 0 and not agent),
                          timeout=datetime.timedelta(seconds=timeout_s), multi_tenant=not agent)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if agent else "0"
    return dist.PrefixStore(f"stackgan/attempt_{attempt}", store)


def teardown(env: DistEnv, synchronize: bool = False) -> None:
    """Destroys the group we created. ``synchronize`` (only on a clean finish, where every rank gets
    here): a barrier first, so that no rank exits while another still has gloo traffic in flight (that
    aborted a peer once with "terminate called without an active exception"). Never on an error path:
    a barrier there would hold a failing rank until the collective timeout. In a ``stackgan`` process the
    group is not destroyed: the process ends at once after (process_end.py)."""
    if env.owns_group and dist.is_initialized():
        try:
            if synchronize:
                dist.barrier()
            if not process_end.leave_groups:  # the stackgan process ends right after: see process_end.py
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
