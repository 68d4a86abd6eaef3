"""A non-editable install (a wheel, as cluster images and containers install) carries what the package reads
at run time: `--preset authors` works from it."""
import json
import os
import shutil
import subprocess
import sys

from conftest import CFG1, REPO, tiny_overrides


def test_preset_authors_works_from_a_wheel_installed_non_editable(synth_data, tmp_path):
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info behind
    src.mkdir()
    shutil.copy(os.path.join(REPO, "setup.py"), src)
    shutil.copytree(os.path.join(REPO, "stackgan_dist"), src / "stackgan_dist",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("stackgan_dist-*.whl")
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    assert (target / "stackgan_dist" / "presets" / "authors.yaml").is_file()
    # only the installed copy on the path (not this checkout), run from elsewhere
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import stackgan_dist; print(stackgan_dist.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True).stdout
    assert where.startswith(str(target)), where
    p = subprocess.run([sys.executable, "-m", "stackgan_dist", "train", CFG1, "--preset", "authors", "--dry-run",
                        *tiny_overrides(synth_data, tmp_path / "r")], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    train = json.loads(p.stdout)["config"]["train"]
    assert train["d_output"] == "sigmoid" and train["wrong_pairs"] == "shift"  # the preset's keys, applied
