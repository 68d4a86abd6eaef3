"""benchmarks/scaling_model.py against arithmetic done by hand (written out beside each expected value).

Assumptions used below (MODEL_ASSUMPTIONS): 8 GPUs per node, NVLink bus bandwidth 450 GB/s, 2 us per hop in a
node and 5 us between nodes, H100 989 TFLOP/s at MFU 25 % (Stage I), HBM 3,350 GB/s, fused Adam 28 bytes per
parameter, a launch floor of 1 ms per step, per-rank BatchNorm down to 8 images per GPU.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import scaling_model as M  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

A = M.MODEL_ASSUMPTIONS


def test_assumptions_the_hand_arithmetic_uses():
    assert (A["gpus_per_node"], A["intra_node_busbw_GBps"], A["latency_us_intra"], A["latency_us_inter"]) == \
        (8, 450.0, 2.0, 5.0)
    assert (A["peak_flops"], A["mfu"]["1"], A["hbm_GBps"], A["adam_bytes_per_param"]) == (989e12, 0.25, 3350.0, 28)
    assert (A["launch_floor_ms"], A["bn_min_per_gpu_batch"], A["per_gpu_batch"]) == (1.0, 8, 64)


def test_allreduce_time_in_a_node_and_across_two():
    # 4 GPUs, one node, 1 MB: 2 (4-1)/4 x 1e6 B / 450e9 B/s + 2 (4-1) x 2 us = 3.333 us + 12 us
    assert M.t_allreduce(10**6, 4, "ring", 25.0) == pytest.approx(15.3333e-6, rel=1e-4)
    # 16 GPUs = 2 nodes, 64 MB, hierarchical: in-node 2 x 7/8 x 64e6 / 450e9 = 248.9 us, across 2 x 1/2 x 64e6 /
    # 25e9 = 2,560 us, latency 2 (7 x 2 us + ceil(log2 2) x 5 us) = 38 us
    assert M.t_allreduce(64 * 10**6, 16, "hierarchical", 25.0) == pytest.approx(2846.889e-6, rel=1e-6)
    # the same as a flat ring: 2 x 15/16 x 64e6 / 25e9 = 4,800 us + 2 x 15 x 5 us = 150 us
    assert M.t_allreduce(64 * 10**6, 16, "ring", 25.0) == pytest.approx(4950e-6, rel=1e-9)
    assert M.t_allreduce(64 * 10**6, 1, "ring", 25.0) == 0.0


def test_buckets_and_powersgd_messages():
    net = M.Net(params=((1000,), (300, 1000), (10,)))
    # reverse order: the 40 B bias opens the first (1 MiB) bucket; the 1.2 MB matrix does not fit beside it, so
    # it opens the second (25 MiB) bucket, where the 4,000 B vector joins it
    assert M.buckets_of(net, 0.0) == [[(10,)], [(300, 1000), (1000,)]]
    # PowerSGD rank 4: 300 x 1000 is compressed ((300 + 1000) x 4 x 2 = 10,400 < 300,000); a vector is not
    # (n x 1: (1000 + 1) x 1 x 2 = 2,002 > 1,000)
    assert M.powersgd_shapes([net], 4) == [(300, 1000, 4)]
    # sent: 1,000 + 10 uncompressed + (300 + 1,000) x 4 = 6,210 elements instead of 301,010
    assert M.powersgd_sent_elements([net], 4) == 6210
    # per bucket [uncompressed, P, Q] bytes: [40, 0, 0] and [1,000 x 4, 300 x 4 x 4, 1,000 x 4 x 4]
    assert M.collectives_for([net], "powersgd", 0.0, 4) == [[[40, 0, 0], [4000, 4800, 16000]]]
    assert M.collectives_for([net], "bf16", 0.0, 4) == [[[20], [602000]]]


def test_compute_time_shrinks_only_above_the_fixed_cost():
    nets = (M.Net(params=((1000,),)), M.Net(params=((500,),)))
    # batch 64 at 10 GFLOP/img: 64 x 1e10 / (0.25 x 989e12) = 2.58847 ms (the MFU target's time)
    assert M.compute_s(1, 64, 1e10, nets) == pytest.approx(2.58847e-3, rel=1e-5)
    # batch 8: fixed = 1,500 params x 28 B / 3,350e9 B/s + 1 ms = 1.0000125 ms; plus 8/64 of (2.5884732 - 1.0000125)
    assert M.compute_s(1, 8, 1e10, nets) == pytest.approx(1.0000125e-3 + 0.125 * 1.5884607e-3, rel=1e-6)


def test_weak_scaling_step_at_two_gpus():
    G, D = M.Net(params=((1000,),)), M.Net(params=((500,),), buffer_elems=100)
    r = M.predict(1, 2, dict(M.TODAY), 0.5, 1e9, 25.0, (G, D))
    # compute: 64 x 1e9 / 247.25e12 = 258.847 us. One bucket each: G 4,000 B -> 2 x 1/2 x 4000 / 450e9 + 2 x 1 x
    # 2 us = 4.00889 us, D 2,000 B -> 4.00444 us; BN buffers 400 B -> 4.00089 us. Nothing hidden: each network's
    # only bucket is its last (reduced after its backward ends), whatever the overlap
    exposed = 4.00889e-6 + 4.00444e-6 + 4.00089e-6
    assert r["compute_ms"] == pytest.approx(0.258847, rel=1e-5)
    assert r["exposed_ms"] == pytest.approx(1e3 * exposed, rel=1e-5)
    assert r["efficiency"] == pytest.approx(258.847 / (258.847 + 12.01422), rel=1e-5)  # 0.95564


def test_strong_scaling_at_the_paper_batch_and_the_batchnorm_floor():
    G, D = M.Net(params=((1000,),)), M.Net(params=((500,),), buffer_elems=100, bn_channels=(10,))
    rows = M.strong_scaling(1, (G, D), 1e10, 25.0, sizes=[1, 2, 16])
    one, two, sixteen = rows
    # 1 GPU, batch 64: 2.58847 ms, no communication
    assert one["step_ms_best"] == pytest.approx(2.58847, rel=1e-5) and one["speedup"] == 1.0
    # 2 GPUs, batch 32: compute 1.0000125 + 0.5 x 1.5884607 = 1.7942429 ms; exposed 12.01422 us as in the weak
    # case (hierarchical = ring in one node); per-rank BN is fine at 32 images
    assert two["batch_per_gpu"] == 32 and two["per_rank_bn_ok"]
    assert two["step_ms_best"] == pytest.approx(1.7942429 + 0.01201422, rel=1e-6)
    assert two["speedup"] == pytest.approx(2.58847 / 1.8062571, rel=1e-5)  # 1.4331
    # sync_bn at 2 GPUs: D's one layer of 10 channels, 3 passes x (forward 21 floats = 84 B, backward 80 B):
    # 3 x (84 / 450e9 + 2 us + 80 / 450e9 + 2 us) = 24.0011 us
    assert two["sync_bn_ms"] == pytest.approx(24.0011e-3, rel=1e-5)
    # 16 GPUs (2 nodes), batch 4 < 8: only global-batch BN is sound, so its cost is in. Compute 1.0000125 +
    # 4/64 x 1.5884607 = 1.0992913 ms. Hierarchical all-reduce: latency 2 (7 x 2 + 5) = 38 us each, plus
    # bytes: G 4000 B -> 2 x 7/8 x 4000 / 450e9 + 4000 / 25e9 = 0.0156 + 0.16 us; D 2000 B -> 0.0078 + 0.08 us;
    # BN buffers 400 B -> 0.0016 + 0.016 us: exposed 114.2810 us. sync_bn: 3 x (38.00369 + 38.00351) us
    sync = 3 * (38.00369e-3 + 38.00351e-3)
    assert not sixteen["per_rank_bn_ok"] and sixteen["batch_per_gpu"] == 4
    assert sixteen["sync_bn_ms"] == pytest.approx(sync, rel=1e-5)
    assert sixteen["step_ms_best"] == pytest.approx(1.0992913 + 0.1142810 + sync, rel=1e-5)  # 1.44159 ms
    assert sixteen["speedup"] == pytest.approx(2.58847 / 1.4415939, rel=1e-4)  # 1.7956
    # epochs: CUB floor(8,855 / 64) = 138 steps, Oxford-102 floor(7,034 / 64) = 109 steps
    assert one["epoch_s"] == pytest.approx({"CUB-200-2011 (birds)": 138 * 2.58847e-3,
                                            "Oxford-102 (flowers)": 109 * 2.58847e-3}, rel=1e-5)
    # 2 -> 16 GPUs gains 1.8062571 / 1.4415939 = 1.253x: above the 1.25x rule, so every count here pays
    assert M.stops_paying_off(rows) is None and M.stops_paying_off(rows, min_gain=1.26) == 16


def test_strong_and_weak_figures_from_the_committed_measurements(tmp_path):
    """scaling_figures.py: JSON + PNG named after the device that measured the inputs and the day, labelled as a
    projection that names those inputs; a file that is not a scaling results JSON is one line and exit 2."""
    import json
    import subprocess

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    src = os.path.join(bench, "results", "scaling-2-core-cpu-shared-2026-12-02.json")
    p = subprocess.run([sys.executable, os.path.join(bench, "scaling_figures.py"), "--from-json", src,
                        "--out-dir", str(tmp_path), "--date", "2026-12-07"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    stem = tmp_path / "scaling-strong-weak-2-core-cpu-shared-2026-12-07"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").stat().st_size > 0
    assert data["label"].startswith("PROJECTION") and "2026-12-02" in data["inputs"] and "CPU" in data["inputs"]
    strong = data["strong"]["rows"]
    assert {(r["stage"], r["gpus"], r["batch_per_gpu"]) for r in strong} == \
        {(s, n, 64 // n) for s in (1, 2) for n in (1, 2, 4, 8, 16)}
    assert all(r["per_rank_bn_ok"] == (r["batch_per_gpu"] >= 8) for r in strong)
    # the paper's shape: a second node (16 GPUs, batch 4) is slower than one node of 8 for both stages
    for st in (1, 2):
        by_n = {r["gpus"]: r for r in strong if r["stage"] == st and r["inter_node_GBps"] == 25.0}
        assert by_n[16]["step_ms_best"] > by_n[8]["step_ms_best"]
        assert data["strong"]["stops_paying_off"][f"{st}@25"] in (2, 4, 8, 16)
    assert {r["gpus"] for r in data["weak"]["rows"]} == {1, 2, 4, 8, 16, 32, 64}
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    p = subprocess.run([sys.executable, os.path.join(bench, "scaling_figures.py"), "--from-json", str(bad),
                        "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "not a scaling results JSON" in p.stderr


def _json_values():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-10, 10**16) | st.floats(allow_nan=True) | st.text(max_size=8)
    return st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["1", "2", "projection", "device", "date", "commit", "flops_per_img_paper", "overlap_used",
                         "chosen", "hook", "algo", "bucket_cap_mb", "rank", "none"]), kids, max_size=6), max_leaves=30)


def test_a_results_json_of_any_shape_is_accepted_or_refused_cleanly():
    """check_source on arbitrary JSON values: the source is returned unchanged or one of the errors main() turns
    into its exit-2 line; and the committed source passes."""
    import json

    from hypothesis import given, settings

    import scaling_figures

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    with open(os.path.join(bench, "results", "scaling-2-core-cpu-shared-2026-12-02.json")) as f:
        good = json.load(f)
    assert scaling_figures.check_source(good) is good

    @settings(max_examples=300, deadline=None)
    @given(_json_values())
    def check(value):
        try:
            assert scaling_figures.check_source(value) is value
        except (ValueError, KeyError, TypeError, AttributeError):
            pass

    check()
