"""Training-step throughput of our GAN step, side by side with a reference-faithful step.

Our step: stackgan_dist.train_step.GANStep over the configured Strategy (DDP at world size 1 here).
Baseline (``--baseline``): the authors' StackGAN-Pytorch step as it runs on the same torch, which is our
own step under the "authors" preset (stackgan_dist/presets/authors.yaml, docs/faithfulness.md; one implementation
of their formulas serves the preset and this baseline): fp32 with torch's default TF32 settings, D ending in
Sigmoid with nn.BCELoss, their D-loss weights, their KL (the mean, times 2), their shifted wrong pairs, D
conditioned on the detached CA mean, torch's default Adam, the frozen Stage-I generator in train mode, NCHW,
no compile, the same widths and batch. It shares our step's mechanics (D frozen in G's phase, one G forward
for both phases), so the speedup counts precision, layout, compile and optimizer choices only: a lower
bound against their code, which also computes D's weight gradients in G's phase.
The two are timed in alternating steps (ABBA) so that both see the same machine load (this machine is
shared); besides wall-clock medians, the process CPU time per step is recorded (``speedup_cpu_time``), which
waiting for a busy CPU does not inflate.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import common  # noqa: F401  (puts the repo on sys.path)
import torch
from torch import nn

from stackgan_dist.config import Config, ModelConfig, apply_overrides, kl_weight, preset_overrides
from stackgan_dist.distributed import make_strategy
from stackgan_dist.distributed.device import local_cuda_device
from stackgan_dist.distributed.env import DistEnv
from stackgan_dist.losses import LossOptions
from stackgan_dist.models.build import build_models, build_stage1_generator
from stackgan_dist.observability.flops import compute_precision, count_flops, measure_matmul_peak, mfu, stated_peak
from stackgan_dist.train_step import GANStep

MIN_CUDA_STEPS = 30  # timed steps on CUDA, at least (events; the default everywhere)
PAPER = {"gf_dim": 128, "df_dim": 64, "condition_dim": 128, "z_dim": 100, "text_dim": 1024}


def make_cfg(a) -> Config:
    cfg = Config()
    m = cfg.model
    m.stage, m.gf_dim, m.df_dim = a.stage, a.gf_dim, a.df_dim
    m.condition_dim, m.z_dim, m.text_dim = a.condition_dim, a.z_dim, a.text_dim
    t = cfg.train
    t.batch_size, t.precision, t.backend, t.compile = a.batch_size, a.precision, a.backend, a.compile
    t.channels_last, t.device = a.channels_last, a.device
    return cfg


def make_batch(cfg: Config, gen: torch.Generator) -> dict:
    b, m = cfg.train.batch_size, cfg.model
    size = 64 if m.stage == 1 else 256
    return {"image": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen),
            "text": torch.randn(b, m.text_dim, generator=gen),
            "cls": torch.arange(b) % 4}


def stage1_for(cfg: Config) -> nn.Module:
    m = cfg.model
    s1 = ModelConfig(stage=1, gf_dim=m.gf_dim, df_dim=m.df_dim, condition_dim=m.condition_dim, z_dim=m.z_dim,
                     text_dim=m.text_dim, ca_relu=m.ca_relu)
    return build_stage1_generator(s1).eval().requires_grad_(False)


def baseline_config(a) -> Config:
    """The authors' step's config: the "authors" preset over the benchmark's widths and batch, fp32, NCHW."""
    return apply_overrides(make_cfg(a), preset_overrides("authors") + [
        "train.backend=ddp", "train.precision=fp32", "train.channels_last=false", "train.compile=false"])


class torch_default_tf32:
    """torch's default TF32 flags (matmuls in full fp32, cuDNN convolutions on TF32) while the baseline
    runs, whatever our step set; restored afterwards."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
        return False


class BaselineStep:
    """Our GANStep under the authors' preset (see the module docstring), with its own models, Stage-I
    generator (whose BatchNorm statistics drift in train mode) and optimizers."""

    def __init__(self, a, device: torch.device, gen: torch.Generator):
        cfg = self.cfg = baseline_config(a)
        torch.manual_seed(0)
        models = build_models(cfg.model)  # D has no text layer: it is conditioned on the CA mean
        G1 = stage1_for(cfg).to(device) if cfg.model.stage == 2 else None
        strategy = make_strategy(cfg, DistEnv(device=device))
        strategy.setup(models.G, models.D)
        self.step = GANStep(strategy, cfg.model.stage, cfg.model.z_dim, cfg.model.condition_dim, kl_weight(cfg), G1,
                            gen, 1, False, cfg.train.color_coeff, LossOptions.from_config(cfg))
        self.cuda = device.type == "cuda"

    def __call__(self, batch: dict) -> dict:
        if not self.cuda:
            return self.step([batch])
        with torch_default_tf32():
            return self.step([batch])


def bench_device(name: str) -> torch.device:
    """cpu, or this process's indexed CUDA device (cuda:LOCAL_RANK, made current): never a bare "cuda"."""
    return local_cuda_device() if name == "cuda" else torch.device("cpu")


def build(a):
    """-> (cfg, ours, baseline or None, batch, device)."""
    cfg = make_cfg(a)
    device = bench_device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    models = build_models(cfg.model)
    G1 = stage1_for(cfg).to(device) if a.stage == 2 else None
    env = DistEnv(device=device)  # world size 1, built by hand: no process group needed
    strategy = make_strategy(cfg, env)
    strategy.setup(models.G, models.D)
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(1)
    ours = GANStep(strategy, a.stage, cfg.model.z_dim, cfg.model.condition_dim, kl_weight(cfg), G1, gen,
                   1, cfg.train.channels_last)
    base = None
    if a.baseline:
        base = BaselineStep(a, device, gen)
    batch = make_batch(cfg, torch.Generator().manual_seed(2))
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return cfg, ours, base, batch, device


def step_flops(ours: GANStep, batch: dict) -> int:
    """FLOPs of one of our steps, counted once per configuration, eagerly (the dispatcher's counter cannot see
    inside compiled graphs; the arithmetic is the same): the compiled modules are swapped for their eager
    originals for this one counted step."""
    s = ours.s
    saved = s.g.wrapped, s.d.wrapped, s.d.unsynced
    s.g.wrapped, s.d.wrapped, s.d.unsynced = s.g.net, s.d.net, s.d.net
    try:
        return count_flops(lambda: ours([batch]))
    finally:
        s.g.wrapped, s.d.wrapped, s.d.unsynced = saved


class Timer:
    """Per-step wall time: CUDA events on the GPU (recorded on the stream, read once at the end, so timing
    adds no host synchronisation between steps), perf_counter around a synchronised step on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.pending: list = []
        self.times: list[float] = []

    def __call__(self, fn) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pending.append((start, end))
        else:
            t = time.perf_counter()
            fn()
            self.times.append(time.perf_counter() - t)

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            self.times += [a.elapsed_time(b) / 1e3 for a, b in self.pending]
            self.pending = []
        return self.times


def run(a) -> dict:
    cfg, ours, base, batch, device = build(a)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    flops = step_flops(ours, batch)  # once per configuration, before any timing
    variants = {"ours": lambda: ours([batch])}
    if base is not None:
        variants["baseline"] = lambda: base(batch)
    for _ in range(a.warmup):
        for fn in variants.values():
            fn()
    sync()
    peak = {}
    for k in variants:  # peak memory per variant (CUDA); CPU: the process's max RSS, shared by both
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            variants[k]()
            sync()
            peak[k] = torch.cuda.max_memory_allocated() / 2 ** 20
    names = list(variants)
    timers = {k: Timer(cuda) for k in variants}
    cpu_times = {k: [] for k in variants}  # process CPU time: the work done, robust to waiting on a shared CPU
    for i in range(a.steps):  # alternate, ABBA: both see the same load on a shared machine, neither always first
        for k in (names if i % 2 == 0 else names[::-1]):
            c = time.process_time()
            timers[k](variants[k])
            cpu_times[k].append(time.process_time() - c)
    times = {k: t.seconds() for k, t in timers.items()}
    if not cuda:
        peak = {k: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 for k in variants}
    b = cfg.train.batch_size
    med = common.percentile(times["ours"], 0.5)
    r = {"stage": a.stage, "precision": a.precision, "backend": a.backend, "batch_size": b,
         "gf_dim": a.gf_dim, "df_dim": a.df_dim, "compile": a.compile, "channels_last": a.channels_last,
         "img_per_s": b / med, "step_ms_p50": 1e3 * med, "step_ms_p90": 1e3 * common.percentile(times["ours"], 0.9),
         "timer": "cuda_events" if cuda else "perf_counter",
         "peak_mem_mb": peak["ours"], "peak_mem_kind": "cuda_max_allocated" if cuda else "process_max_rss",
         "flops_per_img": flops / b, "flops_counted": "once, eager, our step", "steps": a.steps, "warmup": a.warmup,
         "cpu_ms_p50": 1e3 * common.percentile(cpu_times["ours"], 0.5),
         "baseline_img_per_s": None, "speedup": None}
    if base is not None:
        bmed = common.percentile(times["baseline"], 0.5)
        r.update({"baseline_img_per_s": b / bmed, "baseline_step_ms_p50": 1e3 * bmed,
                  "baseline_step_ms_p90": 1e3 * common.percentile(times["baseline"], 0.9),
                  "speedup": bmed / med,
                  "baseline_cpu_ms_p50": 1e3 * common.percentile(cpu_times["baseline"], 0.5),
                  "speedup_cpu_time": common.percentile(cpu_times["baseline"], 0.5)
                  / common.percentile(cpu_times["ours"], 0.5),
                  # the median of per-step ratios: robust to load that drifts during the run
                  "speedup_paired_median": common.percentile([tb / to for tb, to in zip(times["baseline"],
                                                                                          times["ours"])], 0.5)})
    return r


def add_mfu(r: dict, device: torch.device, ceiling: float | None) -> None:
    """MFU only against a datasheet peak, for the precision that actually runs (fp32 convolutions on CUDA
    run in TF32). On CPU there is no datasheet: the achieved FLOP/s stand beside a measured matmul ceiling,
    and there is no MFU (a ratio to a matmul timed on a shared, loaded machine once read 126%)."""
    r["achieved_flop_s"] = r["flops_per_img"] * r["img_per_s"]
    r["matmul_flop_s_measured"] = ceiling
    if device.type != "cuda":
        r.update(compute_precision="fp32", peak_flops_stated=None, mfu=None, mfu_basis=None)
        return
    prec = compute_precision(r["precision"], "cuda", torch.backends.cudnn.allow_tf32,
                             torch.backends.cuda.matmul.allow_tf32)
    peak = stated_peak(common.device_name("cuda"), prec)
    r.update(compute_precision=prec, peak_flops_stated=peak, mfu=None, mfu_basis=None)
    if peak:
        try:
            r["mfu"], r["mfu_basis"] = mfu(r["achieved_flop_s"], peak), f"datasheet {prec} dense"
        except ValueError as e:  # > 1: a measurement error, recorded as such (the timings above stay)
            r["mfu_error"] = str(e)


def matmul_ceiling(device: torch.device, precision: str, n: int) -> float:
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return measure_matmul_peak(device, dt[precision], n=n)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--stage", type=int, default=1, choices=[1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--backend", default="ddp", choices=["ddp", "deepspeed"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--baseline", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=MIN_CUDA_STEPS, help="timed steps (CUDA: at least 30)")
    p.add_argument("--peak-n", type=int, default=2048, help="matrix size of the measured-peak matmul")
    for k, v in PAPER.items():  # the paper's widths by default
        p.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    p.add_argument("--json", default="")
    return p


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is visible")
    if a.device == "cuda" and a.steps < MIN_CUDA_STEPS:
        sys.exit(f"--steps {a.steps}: at least {MIN_CUDA_STEPS} timed steps on CUDA")
    if a.backend == "deepspeed":
        raise SystemExit("--backend deepspeed: not wired into this benchmark yet (it needs a launcher)")
    r = run(a)
    device = bench_device(a.device)
    add_mfu(r, device, matmul_ceiling(device, a.precision, a.peak_n))
    out = {**common.header(a.device), "results": [r]}
    common.write_json(out, a.json)
    print(format_row(r), flush=True)
    return out


def format_row(r: dict) -> str:
    s = (f"stage{r['stage']} {r['precision']} b{r['batch_size']} gf{r['gf_dim']}/df{r['df_dim']}"
         f"{' NHWC' if r['channels_last'] else ''}{' compiled' if r['compile'] else ''}: "
         f"{r['img_per_s']:.1f} img/s (p50 {r['step_ms_p50']:.1f} ms, p90 {r['step_ms_p90']:.1f} ms), "
         f"{r['flops_per_img'] / 1e9:.2f} GFLOP/img, {r['achieved_flop_s'] / 1e12:.3f} TFLOP/s")
    if r.get("mfu") is not None:
        s += f", MFU {100 * r['mfu']:.1f}% ({r['mfu_basis']})"
    elif r.get("matmul_flop_s_measured"):
        s += f" (matmul ceiling measured here {r['matmul_flop_s_measured'] / 1e12:.3f} TFLOP/s; no MFU)"
    if r.get("mfu_error"):
        s += f", MFU not reported: {r['mfu_error']}"
    if r.get("speedup"):
        s += f", baseline {r['baseline_img_per_s']:.1f} img/s, speedup {r['speedup']:.2f}x"
    return s


if __name__ == "__main__":
    main()
