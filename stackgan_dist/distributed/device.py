"""Which CUDA device a process uses: always an indexed one (``cuda:N``), chosen from its local rank.

``torch.cuda.set_device(torch.device("cuda"))`` is refused by torch (an index-less device), and an
index-less device elsewhere means "the current device", which is device 0 until someone sets it: every
rank of a node would then pile onto GPU 0. So the index is decided once, here, by a pure function.
"""
from __future__ import annotations

import os

import torch

from ..errors import UserError


def cuda_index(local_rank: int | str | None, device_count: int) -> int:
    """The CUDA device index for a process with this local rank when ``device_count`` devices are visible.

    ``local_rank`` may be the raw ``LOCAL_RANK`` / ``SLURM_LOCALID`` string; None or "" means 0 (a plain
    process). With one device per task (Slurm ``--gpus-per-task``, CUDA_VISIBLE_DEVICES per rank) every rank
    sees its own GPU as device 0: the index wraps (local rank 3 of 1 visible device -> 0).
    """
    if device_count < 1:
        raise UserError("no CUDA device is visible (CUDA_VISIBLE_DEVICES, driver); use train.device=cpu")
    if local_rank is None or (isinstance(local_rank, str) and not local_rank.strip()):
        return 0
    try:
        r = int(local_rank)
    except (TypeError, ValueError):
        raise UserError(f"LOCAL_RANK={local_rank!r} is not a whole number; unset it or set it to this "
                        "process's rank on its node") from None
    if r < 0:
        raise UserError(f"LOCAL_RANK={r} is negative; set it to this process's rank on its node")
    return r % device_count


def local_cuda_device(local_rank: int | str | None = None) -> torch.device:
    """``cuda:N`` for this process (``LOCAL_RANK`` from the environment when not given); made current."""
    if local_rank is None:
        local_rank = os.environ.get("LOCAL_RANK")
    dev = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(dev)
    return dev
