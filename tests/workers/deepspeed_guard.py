"""Worker of tests/test_deepspeed.py's non-finite-gradient test: ``python tests/workers/deepspeed_guard.py OUT``
under torchrun (2 ranks). A NaN in D's loss on rank 1 only must skip the step on both ranks, at ZeRO 0, 1
and 2; each rank writes what it saw to OUT.rankR.json."""
import json
import sys


def _guard_worker(out: str) -> None:
    import torch

    from stackgan_dist.config import load_config
    from stackgan_dist.distributed.env import init_distributed, teardown
    from stackgan_dist.distributed.seeding import seed_all
    from stackgan_dist.distributed import make_strategy
    from stackgan_dist.models.build import build_models

    torch.set_num_threads(1)
    env = init_distributed("cpu", 60)
    res = {}
    for zero in (0, 1, 2):
        cfg = load_config(None, ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16",
                                 "model.text_dim=32", "train.backend=deepspeed", f"train.zero_stage={zero}",
                                 "train.batch_size=4"])
        seed_all(0)
        m = build_models(cfg.model)
        s = make_strategy(cfg, env)
        s.setup(m.G, m.D)
        g = torch.Generator().manual_seed(env.rank)
        rows = []
        for bad in (False, True, False):
            before = torch.cat([p.detach().flatten().clone() for p in s.d.net.parameters()])
            o = s.d.wrapped(torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 32, generator=g))
            loss = o["cond"].float().mean()
            if bad and env.rank == 1:
                loss = loss * float("nan")
            s.d.backward(loss)
            s.d.step()
            after = torch.cat([p.detach().flatten() for p in s.d.net.parameters()])
            opt = s.d.engine.optimizer
            inner = getattr(opt, "optimizer", opt)
            finite_state = all(bool(torch.isfinite(v).all()) for st in inner.state.values()
                               for v in st.values() if torch.is_tensor(v))
            rows.append({"bad": bad, "changed": not torch.equal(before, after),
                         "finite_params": bool(torch.isfinite(after).all()), "finite_adam": finite_state})
        res[zero] = {"rows": rows, "skipped": s.skipped_steps()["d"]}
    with open(f"{out}.rank{env.rank}.json", "w") as f:
        json.dump(res, f)
    teardown(env)


if __name__ == "__main__":
    _guard_worker(sys.argv[1])
