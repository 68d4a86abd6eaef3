"""Loader throughput: our shard stream vs a reference-style loader, on the same CUB-like data, Stage-II size.

Data: full-size JPEGs (default 500 x 375, noisy so that their byte sizes are realistic) with bounding boxes,
in the StackGAN birds release layout (tests/assets/make_release.py), converted once with
``prepare stackgan`` (not timed).

- ours: stackgan_dist.data.read.loader.ShardStream at stage 2: reads tar shards, decodes the 304 px stored JPEG,
  random 256 crop + flip, one caption embedding drawn, uint8 batches (normalisation happens on the device).
- reference: what the original StackGAN code's TextDataset does per sample: PIL opens the full-size JPEG,
  crops the box (1.5 x its larger side), resizes to 304 (bilinear), random 256 crop + flip, ToTensor +
  Normalize to float in [-1, 1]; embeddings held in memory from the pickle, one of 10 drawn.

Per worker: each loader runs in this process (num_workers=0), the two alternating in rounds (ABBA) so that
both see the same machine load (this machine may be shared); the medians of the rounds are reported, by
wall clock and per second of this process's CPU time (which waiting for a busy CPU does not inflate).
Total: a DataLoader with ``--workers`` worker processes, each loader timed once, alternately.
``speedup`` = ours / reference, per worker.

Tar reading: stackgan_dist.data.read.tar_reader (a port of tarfile's stream reading, kept only while it is
faster and tests/test_tar_reader.py shows it equal) against ``tarfile.open(fileobj, "r|")`` on the same
shards, every member's bytes read, ABBA rounds: ``tar_speedup`` = tarfile's time / ours.
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time

import common
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from stackgan_dist.data.read.index import resolve_dataset
from stackgan_dist.data.read.loader import LoaderSpec, make_loader
from stackgan_dist.data.read.tar_reader import iter_tar_files
from stackgan_dist.safety.unpickle import safe_load
from stackgan_dist.data.prepare.stackgan_release import crop_box, load_bboxes, prepare_stackgan

sys.path.insert(0, os.path.join(common.REPO, "tests", "assets"))
from make_release import make_birds  # noqa: E402

LOAD, CROP = 304, 256  # Stage II: 256 crops of a 304 load, as the original (76/64 of the target size)


class ReferenceBirds(Dataset):
    """The original loader's per-sample work (StackGAN-Pytorch miscc/datasets.py TextDataset)."""

    def __init__(self, root: str, split: str = "train"):
        self.root = root
        self.names = list(safe_load(os.path.join(root, split, "filenames.pickle")))
        self.emb = np.asarray(safe_load(os.path.join(root, split, "char-CNN-RNN-embeddings.pickle")), np.float32)
        self.bbox = load_bboxes(os.path.join(root, "CUB_200_2011"))
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        name = self.names[i]
        img = Image.open(os.path.join(self.root, "CUB_200_2011", "images", name + ".jpg")).convert("RGB")
        img = crop_box(img, self.bbox[name]).resize((LOAD, LOAD), Image.BILINEAR)
        a = np.asarray(img)
        x, y = (int(self.rng.integers(0, LOAD - CROP + 1)) for _ in range(2))
        a = a[y:y + CROP, x:x + CROP]
        if self.rng.integers(0, 2):
            a = a[:, ::-1]
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float().div_(255)  # ToTensor
        t = t.sub_(0.5).div_(0.5)  # Normalize((.5,.5,.5), (.5,.5,.5))
        e = self.emb[i, int(self.rng.integers(0, self.emb.shape[1]))]
        return t, torch.from_numpy(e)


def make_data(root: str, n: int, size: tuple[int, int], dim: int) -> str:
    make_birds(root, n_train=n, n_test=1, size=size, dim=dim)
    out = os.path.join(root, "shards", "train")
    prepare_stackgan(root, "birds", "train", out, workers=max(1, min(4, os.cpu_count() or 1)), progress=False)
    return out


def rate(it, batches: int, batch_size: int, cpu: bool = False) -> float | tuple[float, float]:
    """samples/s over ``batches`` batches pulled from ``it`` (and per second of this process's CPU time)."""
    c, t = time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(it)
    n = batches * batch_size
    wall = n / (time.perf_counter() - t)
    return (wall, n / max(time.process_time() - c, 1e-9)) if cpu else wall


def _read_ours(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in iter_tar_files(f))


def _read_tarfile(path: str) -> int:
    n = 0
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as t:
        for m in t:
            if m.isreg():
                t.extractfile(m).read()
                n += 1
    return n


def tar_rates(paths: list[str], rounds: int) -> dict:
    """Microseconds per member (median of ABBA rounds) for our tar reader and tarfile's stream mode."""
    got: dict = {"ours": [], "tarfile": []}
    fns = {"ours": _read_ours, "tarfile": _read_tarfile}
    for i in range(max(2, rounds)):
        for name in (("ours", "tarfile") if i % 2 == 0 else ("tarfile", "ours")):
            t = time.perf_counter()
            n = sum(fns[name](p) for p in paths)
            got[name].append((time.perf_counter() - t) / n * 1e6)
    ours, ref = common.percentile(got["ours"], 0.5), common.percentile(got["tarfile"], 0.5)
    return {"tar_reader_us_per_member": ours, "tarfile_us_per_member": ref, "tar_speedup": ref / ours}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64, help="CUB-like images generated")
    p.add_argument("--image-size", type=int, nargs=2, default=[500, 375])
    p.add_argument("--text-dim", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4, help="batches per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the total rate (0: skip)")
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # a loader worker is one process on one core
    with tempfile.TemporaryDirectory(dir=a.workdir or None) as tmp:
        t = time.perf_counter()
        shards = make_data(tmp, a.images, tuple(a.image_size), a.text_dim)
        prep_s = time.perf_counter() - t
        info = resolve_dataset(shards)
        ref = ReferenceBirds(tmp)
        B = a.batch_size

        def ours_iter(workers: int):
            _, dl = make_loader(info, LoaderSpec(2, B, seed=0, num_workers=workers, shuffle_buffer=64))
            return iter(dl)

        def ref_iter(workers: int):
            kw = {"prefetch_factor": 2, "multiprocessing_context": "fork"} if workers else {}
            dl = DataLoader(ref, batch_size=B, shuffle=True, drop_last=True, num_workers=workers,
                            persistent_workers=False, **kw)

            def forever():
                while True:
                    yield from dl
            return forever()

        o_it, r_it = ours_iter(0), ref_iter(0)
        next(o_it), next(r_it)  # warm-up: file cache, first decode
        got: dict = {"ours": [], "reference": []}
        its = {"ours": o_it, "reference": r_it}
        for i in range(a.rounds):  # ABBA: neither always first
            for name in (("ours", "reference") if i % 2 == 0 else ("reference", "ours")):
                got[name].append(rate(its[name], a.batches, B, cpu=True))
        ours, refs = [w for w, _ in got["ours"]], [w for w, _ in got["reference"]]
        res = {"ours_per_worker": common.percentile(ours, 0.5), "reference_per_worker": common.percentile(refs, 0.5),
               "ours_rounds": ours, "reference_rounds": refs,
               # samples per second of CPU time: what one worker process delivers on a core of its own
               "ours_per_worker_cpu_time": common.percentile([c for _, c in got["ours"]], 0.5),
               "reference_per_worker_cpu_time": common.percentile([c for _, c in got["reference"]], 0.5)}
        if a.workers > 0:
            n_tot = max(a.batches * a.workers * 2, 4)
            for name, make in (("ours", ours_iter), ("reference", ref_iter)):
                it = make(a.workers)
                for _ in range(a.workers):  # each worker's first batch: start-up, not throughput
                    next(it)
                res[f"{name}_total"] = rate(it, n_tot, B)
                del it
        res.update(tar_rates([s.url for s in info.shards], a.rounds))
        jpg_kb = np.mean([os.path.getsize(os.path.join(tmp, "CUB_200_2011", "images", n + ".jpg"))
                          for n in ref.names]) / 1024
    res.update({"speedup": res["ours_per_worker"] / res["reference_per_worker"],
                "speedup_cpu_time": res["ours_per_worker_cpu_time"] / res["reference_per_worker_cpu_time"],
                "workers": a.workers,
                "batch_size": B, "stage": 2, "load_size": LOAD, "crop": CROP, "images": a.images,
                "source_image_size": list(a.image_size), "source_jpeg_kb_mean": jpg_kb, "text_dim": a.text_dim,
                "prepare_s": prep_s, "unit": "samples/s"})
    out = {**common.header("cpu"), "dataloader": res}
    common.write_json(out, a.json)
    print(f"{'loader':<10} {'per worker':>12} {'total (' + str(a.workers) + ' workers)':>20}")
    for name in ("ours", "reference"):
        tot = res.get(f"{name}_total")
        print(f"{name:<10} {res[name + '_per_worker']:>12.1f} {tot if tot is None else round(tot, 1)!s:>20}")
    print(f"speedup (per worker): {res['speedup']:.2f}x wall clock, {res['speedup_cpu_time']:.2f}x per CPU second",
          flush=True)
    print(f"tar reading: ours {res['tar_reader_us_per_member']:.1f} us/member, tarfile "
          f"{res['tarfile_us_per_member']:.1f} us/member ({res['tar_speedup']:.2f}x)", flush=True)
    return out


if __name__ == "__main__":
    main()
