"""Worker of tests/test_comm_options.py: ``python tests/workers/comm_options.py OUT`` under torchrun (2 ranks).
Trains the same tiny Stage-I GAN from the same start with each ``distributed.*`` option; each rank saves its
results to OUT.rankR. The test module reads STEPS and VARIANTS from here (one definition)."""
import sys

STEPS = 5  # optimizer steps per variant (each 2 micro-batches)
VARIANTS = {  # name -> distributed.* overrides
    "none": [],
    "fp16": ["distributed.comm_hook=fp16"],
    "bf16": ["distributed.comm_hook=bf16"],
    # PowerSGD from step 3 (steps 1-2: plain all-reduce, its warm-up)
    "powersgd": ["distributed.comm_hook=powersgd", "distributed.powersgd_rank=2", "distributed.powersgd_start_step=2"],
    # PowerSGD over many buckets: on gloo torch's hook deadlocked with two buckets in flight (wrap.py runs
    # them one at a time on CPU); a hang fails the fixture at its timeout
    "powersgd_buckets": ["distributed.comm_hook=powersgd", "distributed.powersgd_rank=2",
                         "distributed.powersgd_start_step=2", "distributed.bucket_cap_mb=0.05"],
    # ~50 kB buckets (many of them): the same sums, so the same bits as "none"
    "small_buckets": ["distributed.bucket_cap_mb=0.05"],
}


def _worker(out: str) -> None:
    import torch

    from stackgan_dist.checkpoint.manager import to_cpu
    from stackgan_dist.config import load_config
    from stackgan_dist.distributed.env import init_distributed, teardown
    from stackgan_dist.distributed.seeding import seed_all
    from stackgan_dist.distributed import make_strategy, unwrap
    from stackgan_dist.models.build import build_models
    from stackgan_dist.train_step import GANStep

    torch.set_num_threads(1)
    env = init_distributed("cpu", 120)
    base = ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16", "model.text_dim=32",
            "train.lr_g=1e-3", "train.lr_d=1e-3", "train.grad_accum=2", "train.batch_size=4"]
    g = torch.Generator().manual_seed(100 + env.rank)  # each rank its own data
    batches = [[{"image": torch.randint(0, 256, (4, 3, 64, 64), generator=g, dtype=torch.uint8),
                 "text": torch.randn(4, 32, generator=g), "cls": torch.arange(4) + 4 * i} for i in range(2)]
               for _ in range(STEPS + 3)]
    res = {}
    for name, ov in VARIANTS.items():
        cfg = load_config(None, base + ov)
        if name == "small_buckets":  # static graph only without accumulation (pytorch#143580): one step
            res["static_graph"] = _static_graph_run(env, base, batches)
        seed_all(0)
        models = build_models(cfg.model)
        s = make_strategy(cfg, env)
        s.setup(models.G, models.D)
        step = GANStep(s, 1, 16, 16, cfg.train.kl_coeff, None, torch.Generator().manual_seed(env.rank),
                       cfg.train.grad_accum)
        losses = [step(batches[i]) for i in range(STEPS)]
        r = {"G": to_cpu(unwrap(s.g.net).state_dict()), "D": to_cpu(unwrap(s.d.net).state_dict()),
             "losses": [{k: float(v) for k, v in x.items() if k != "bad"} for x in losses],
             "skipped": s.skipped_steps(), "bucket_bytes_cap": s.g._ddp.bucket_bytes_cap,
             "static_graph": bool(s.g._ddp.static_graph)}
        if s.d.powersgd is not None:
            r["compression_rate_d"] = s.d.powersgd.compression_stats()[0]
            r["powersgd_iter_d"] = s.d.powersgd.iter
            # the guard with PowerSGD's error feedback: a NaN in D's loss on rank 0 only, then clean steps
            img = torch.randn(4, 3, 64, 64)
            d_out = s.d.wrapped(img, torch.randn(4, 32))
            bad = d_out["cond"].float().mean() * (float("nan") if env.rank == 0 else 1.0)
            s.d.backward(bad)
            s.d.step()
            r["skipped_after_nan"] = s.skipped_steps()
            r["error_memory_cleared"] = not s.d.powersgd.error_dict
            for i in range(STEPS, STEPS + 3):
                step(batches[i])
            r["skipped_end"] = s.skipped_steps()
            r["D_after_nan"] = to_cpu(unwrap(s.d.net).state_dict())
            r["G_after_nan"] = to_cpu(unwrap(s.g.net).state_dict())
        res[name] = r
    torch.save(res, f"{out}.rank{env.rank}")
    teardown(env, synchronize=True)


def _static_graph_run(env, base, batches) -> dict:
    """3 steps without accumulation with static_graph (D is called twice before its backward) and the same
    3 steps without it."""
    import torch

    from stackgan_dist.checkpoint.manager import to_cpu
    from stackgan_dist.config import load_config
    from stackgan_dist.distributed.seeding import seed_all
    from stackgan_dist.distributed import make_strategy, unwrap
    from stackgan_dist.models.build import build_models
    from stackgan_dist.train_step import GANStep

    out = {}
    for sg in ("true", "false"):
        cfg = load_config(None, [x for x in base if not x.startswith("train.grad_accum")] +
                          ["train.grad_accum=1", f"distributed.static_graph={sg}"])
        seed_all(0)
        models = build_models(cfg.model)
        s = make_strategy(cfg, env)
        s.setup(models.G, models.D)
        step = GANStep(s, 1, 16, 16, cfg.train.kl_coeff, None, torch.Generator().manual_seed(env.rank), 1)
        for i in range(3):
            step(batches[i][:1])
        out[sg] = {"G": to_cpu(unwrap(s.g.net).state_dict()), "D": to_cpu(unwrap(s.d.net).state_dict()),
                   "static_graph": bool(s.g._ddp.static_graph), "skipped": s.skipped_steps()}
    return {**out["true"], "reference": out["false"]}


if __name__ == "__main__":
    _worker(sys.argv[1])
