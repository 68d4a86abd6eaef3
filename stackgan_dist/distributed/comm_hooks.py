"""DDP gradient communication from ``distributed.*``: a compression hook (fp16/bf16 casts, PowerSGD), the bucket
size and DDP's static graph, on each of the two DDP modules (each its own hook state).

Hooks run only when a module's reducer fires: never under ``no_sync`` (accumulation micro-batches keep their
local gradients; the hook sees the accumulated sum once) and never in G's phase for D (D's unsynced module).
PowerSGD's error feedback and warm-start memory are per-rank state that is not checkpointed: a resumed (or
resized) run starts with plain all-reduce for ``powersgd_start_step`` steps again, then fresh error feedback; a
step the guard skips clears that state too (it would carry the NaN into every later step), and with fp16 loss
scaling a change of the scale rescales the error it keeps (``rescale_powersgd_error``). On CPU (gloo) PowerSGD
runs one bucket at a time (``_one_bucket_at_a_time``: torch's hook deadlocks gloo with two in flight).
"""
from __future__ import annotations

import torch

from ..errors import UserError


def _one_bucket_at_a_time(hook):
    """``hook`` run to completion inside the call (the returned future is already done). gloo runs a future's
    continuations on its few worker threads, and torch's PowerSGD issues its second and third all-reduce from
    continuations that block on them: with two buckets in flight the ranks issued those collectives in
    different orders, or ran out of threads, and deadlocked (seen here at two buckets per module). CUDA
    futures run continuations in stream order, so only CPU runs pay this: PowerSGD's communication does not
    overlap the backward on CPU."""

    def one_bucket_hook(state, bucket):
        done = torch.futures.Future()
        done.set_result(hook(state, bucket).wait())
        return done

    return one_bucket_hook


def comm_hook_for(dcfg, process_group=None, serialize: bool = False):
    """-> (hook, state) for ``DistributedDataParallel.register_comm_hook``, or None for the built-in fp32
    all-reduce. fp16/bf16: torch's compress hooks (the bucket cast down, all-reduced, cast back to fp32; the
    optimizer sees fp32 gradients). powersgd: torch's PowerSGD with error feedback and warm start, a new state
    per module (its buckets and error memory are the module's own)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if dcfg.comm_hook == "none":
        return None
    if dcfg.comm_hook == "fp16":
        return default_hooks.fp16_compress_hook, process_group
    if dcfg.comm_hook == "bf16":
        return _bf16_compress, process_group
    if dcfg.comm_hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=process_group,
                                            matrix_approximation_rank=dcfg.powersgd_rank,
                                            start_powerSGD_iter=dcfg.powersgd_start_step,
                                            use_error_feedback=True, warm_start=True)
        return (_one_bucket_at_a_time(powerSGD_hook.powerSGD_hook) if serialize else powerSGD_hook.powerSGD_hook), state
    raise UserError(f"distributed.comm_hook={dcfg.comm_hook!r} is not one of none, fp16, bf16, powersgd")


def _bf16_compress(process_group, bucket):  # no annotations: DDP compares them with its own objects
    """torch's ``bf16_compress_hook`` under another name: DDP refuses that name unless CUDA with NCCL >= 2.10
    (a check written for old NCCL); gloo reduces bf16 as well, so CPU runs and the tests run the same hook."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.bf16_compress_hook(process_group, bucket)


def ddp_comm_kwargs(dcfg) -> dict:
    """DistributedDataParallel keyword arguments from ``distributed.*`` (only those set: torch's defaults stay)."""
    kw = {}
    if dcfg.bucket_cap_mb > 0:
        kw["bucket_cap_mb"] = dcfg.bucket_cap_mb
    if dcfg.static_graph:
        kw["static_graph"] = True
    return kw


def reset_powersgd(state) -> None:
    """Forget PowerSGD's error feedback and warm-start memory (rebuilt at the next synced backward: zero error,
    fresh random Q drawn from the state's own seeded stream, equal on every rank since every rank skips)."""
    state.error_dict.clear()
    state.p_memory_dict.clear()
    state.q_memory_dict.clear()


def rescale_powersgd_error(state, factor: float) -> None:
    """After the loss scale changed by ``factor``: the next step's gradients are scaled by the new scale, so the
    error PowerSGD kept (the part of the last scaled gradients its approximation left out) is rescaled with them;
    without this a scale growth halves, a backoff doubles, what error feedback adds back."""
    if factor != 1.0:
        for e in state.error_dict.values():
            e.mul_(factor)
