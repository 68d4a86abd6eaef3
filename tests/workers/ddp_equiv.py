"""Worker of tests/test_distributed.py's batch-equivalence tests: ``python tests/workers/ddp_equiv.py OUT MODE``,
under torchrun (2 ranks) or as one plain process. Writes rank 0's G, D and D loss after one GAN step to OUT."""
import sys

B = 8  # global batch


def _equiv_worker(out: str, mode: str) -> None:
    """One GAN step on a fixed global batch of B samples with fixed noise.

    mode "sync_bn": 2 ranks x B/2 with model.sync_bn=true, or 1 process x B.
    mode "local_bn": 2 ranks x B/2 without sync_bn, or 1 process x B/2 with grad_accum=2.
    The captions repeat with period B/2, so the "wrong" captions (the batch shifted by one) are the
    same whether the shift runs over B samples or over each half.
    """
    import torch

    from stackgan_dist.checkpoint.manager import to_cpu
    from stackgan_dist.config import load_config
    from stackgan_dist.distributed.env import init_distributed, teardown
    from stackgan_dist.distributed.seeding import seed_all
    from stackgan_dist.distributed import make_strategy, unwrap
    from stackgan_dist.models.build import build_models
    from stackgan_dist.train_step import GANStep

    torch.set_num_threads(1)
    env = init_distributed("cpu", 60)
    ov = ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16", "model.text_dim=32",
          "train.lr_g=1e-3", "train.lr_d=1e-3"]
    half = B // 2
    accum = 2 if (mode == "local_bn" and env.world_size == 1) else 1
    ov += [f"model.sync_bn={'true' if mode == 'sync_bn' else 'false'}", f"train.grad_accum={accum}"]
    cfg = load_config(None, ov)
    g = torch.Generator().manual_seed(1234)
    text_half = torch.randn(half, 32, generator=g)
    batch = {"image": torch.randint(0, 256, (B, 3, 64, 64), generator=g, dtype=torch.uint8),
             "text": torch.cat([text_half, text_half]), "cls": torch.full((B,), -1)}
    noise = {"z": torch.randn(B, 16, generator=g), "eps": torch.randn(B, 16, generator=g)}

    def part(i, n):  # rows i*B/n .. (i+1)*B/n
        sl = slice(i * B // n, (i + 1) * B // n)
        return {k: v[sl] for k, v in batch.items()}, {k: v[sl] for k, v in noise.items()}

    if env.world_size == 2:
        parts = [part(env.rank, 2)]
    elif accum == 2:
        parts = [part(0, 2), part(1, 2)]
    else:
        parts = [part(0, 1)]

    class FixedNoiseStep(GANStep):
        """Draws the test's noise rows instead of this rank's generator stream."""
        queue: list = []

        def _noise(self, b, device):
            n = self.queue.pop(0)
            assert n["z"].shape[0] == b
            return {k: v.to(device) for k, v in n.items()}

    seed_all(0)
    models = build_models(cfg.model)
    s = make_strategy(cfg, env)
    s.setup(models.G, models.D)
    # Adam's first step is lr * sign(grad) wherever |grad| >> eps, which turns float-rounding noise in
    # tiny gradients into lr-sized parameter differences; a large eps keeps the update proportional to
    # the gradient, so the comparison below measures the gradients themselves
    for ph in s.phases:
        for grp in ph.optimizer.param_groups:
            grp["eps"] = 0.1
    step = FixedNoiseStep(s, 1, 16, 16, cfg.train.kl_coeff, None, torch.Generator(), accum)
    step.queue = [p[1] for p in parts]
    losses = step([p[0] for p in parts])
    if env.is_main:
        torch.save({"G": to_cpu(unwrap(s.g.net).state_dict()), "D": to_cpu(unwrap(s.d.net).state_dict()),
                    "d_loss": float(losses["d_loss"])}, out)
    teardown(env, synchronize=True)


if __name__ == "__main__":
    _equiv_worker(sys.argv[1], sys.argv[2])
