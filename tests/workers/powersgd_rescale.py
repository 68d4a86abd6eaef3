"""Worker of tests/test_comm_options.py's loss-scale test: ``python tests/workers/powersgd_rescale.py STORE``.
A world-size-1 DDP with PowerSGD and a doubling GradScaler; prints one JSON line of per-step rows."""
import json, sys
import torch, torch.distributed as dist
from torch import nn
from stackgan_dist.config import DistributedConfig
from stackgan_dist.distributed.comm_hooks import comm_hook_for
from stackgan_dist.distributed.ddp import DDPPhase

torch.manual_seed(0)
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
w = nn.parallel.DistributedDataParallel(m)
d = DistributedConfig()
d.comm_hook, d.powersgd_rank, d.powersgd_start_step = "powersgd", 1, 2
hook, state = comm_hook_for(d, serialize=True)
w.register_comm_hook(state, hook)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=1)  # doubles after every clean step
phase = DDPPhase("g", w, m, torch.optim.Adam(m.parameters(), lr=1e-3), torch.device("cpu"), scaler, state)
x = torch.randn(8, 16)
rows = []
for i in range(5):
    phase.backward(w(x).pow(2).mean())
    err = {k: v.clone() for k, v in state.error_dict.items()}
    s0 = scaler.get_scale()
    phase.step()
    rows.append({"scale_ratio": scaler.get_scale() / s0, "buckets": len(err),
                 "rescaled": all(torch.equal(state.error_dict[k], v * 2) for k, v in err.items()),
                 "nonzero": all(bool(v.abs().sum() > 0) for v in err.values())})
dist.destroy_process_group()
print(json.dumps(rows))
