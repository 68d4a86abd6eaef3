"""``stackgan`` subcommands: prepare, train, sample, eval, inspect, report, sweep.

Exit codes (stackgan_dist/errors.py, docs/checkpoints.md "Exit codes"): 0 done; 2 the user must act (UserError: one line
on stderr, no traceback); 75 requeue me (checkpointed on a scheduler signal, or a transient failure such as
a checkpoint write on a full disk); 130 Ctrl-C; 141 stdout closed early (`stackgan ... | head`); anything
else a crash. Every option's help shows its default the same way (_Help); see docs/README.md "Commands".
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import process_end
from .errors import EXIT_INTERRUPTED, Preempted, StartupSignal, TransientError, UserError
from .observability.logging import reset_logging


def _cmd_prepare(a) -> int:
    return a.func(a)  # each source's command, with its parser, in data/prepare/prepare_cli.py


def _check_config_path(path: str) -> None:
    """A directory given as the config: name the YAML files in it (the user meant one of them)."""
    if os.path.isdir(path):
        try:
            names = sorted(n for n in os.listdir(path) if n.endswith((".yaml", ".yml")))
        except OSError:
            names = []
        hint = f"give one of its YAML files: {', '.join(os.path.join(path, n) for n in names)}" if names else \
            "it holds no YAML file"
        raise UserError(f"config {path} is a directory; {hint}")


def _cmd_train(a) -> int:
    from .checkpoint.signals import install_early

    install_early()  # a scheduler signal while the run starts is not fatal: it checkpoints at its first step
    from .config import load_config, preset_overrides
    from .train import run_training

    _check_config_path(a.config)
    if a.dry_run:
        return _dry_run(a)
    if a.nodes is not None or a.tasks_per_node is not None:
        raise UserError("--nodes and --tasks-per-node plan a layout for --dry-run; a real run takes its layout "
                        "from its launcher (torchrun, srun, Ray)")
    device = [f"train.device={a.device}"] if a.device else []
    cfg = load_config(a.config, (preset_overrides(a.preset) if a.preset else []) + list(a.overrides) + device)
    run_training(cfg, fresh=a.fresh)
    return 0


def _dry_run(a) -> int:
    """``train --dry-run``: every check a real start makes, nothing written, no process group; prints the
    start plan as JSON. ``--device cuda`` (or train.device=cuda) plans a CUDA run on a host without one;
    ``--nodes N --tasks-per-node T`` (or WORLD_SIZE) the layout. Under a launcher every rank checks (its
    device may differ) and only the main rank speaks: the plan, or the error line (the other ranks exit with
    the same code, silently)."""
    from .config import load_config, preset_overrides
    from .distributed.env import planned_env
    from .train import dry_run_checks

    main = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) in ("", "0")
    try:
        if (a.nodes is None) != (a.tasks_per_node is None) or min(a.nodes or 1, a.tasks_per_node or 1) < 1:
            raise UserError("--nodes and --tasks-per-node go together, each at least 1 (the layout to plan)")
        device = [f"train.device={a.device}"] if a.device else []
        cfg = load_config(a.config, (preset_overrides(a.preset) if a.preset else []) + list(a.overrides) + device)
        world = a.nodes * a.tasks_per_node if a.nodes else None
        layout = f"{a.nodes} node(s) x {a.tasks_per_node} task(s)" if a.nodes else ""
        summary = dry_run_checks(cfg, fresh=a.fresh, env=planned_env(cfg.train.device, world, layout))
        if a.nodes:
            summary.update(nodes=a.nodes, tasks_per_node=a.tasks_per_node)
    except UserError as e:
        if main:
            raise
        return e.exit_code
    if main:
        print(json.dumps(summary, indent=1))
    return 0


MAX_EMBEDDINGS = 1 << 16  # rows of an --embeddings file, checked in its header before anything is read


def _load_embeddings(path: str, text_dim: int):
    """An (N, text_dim) float array from a .npy file (no pickles; its header checked before its data)."""
    import numpy as np

    from .errors import DataError
    from .safety.budgets import OverBudget, read_npy
    from .safety.files import open_regular

    try:
        with open_regular(path, "--embeddings file") as f:
            arr = read_npy(f, text_dim, max_rows=MAX_EMBEDDINGS)
    except (OverBudget, DataError, OSError) as e:
        raise UserError(f"cannot read --embeddings {path}: {e}") from None
    if arr.ndim == 1:
        arr = arr[None]
    if not np.isfinite(arr).all():
        raise UserError(f"--embeddings {path}: holds non-finite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _cmd_sample(a) -> int:
    import torch

    from .data.text.text_encoders import make_encoder
    from .inference import check_output_path, generate, load_run
    from .observability.images import labelled_grid, save_png, to_uint8

    if (bool(a.text) + bool(a.embeddings) + a.from_data) != 1:
        raise UserError("give captions with --text (repeatable), precomputed embeddings with --embeddings FILE.npy, "
                        "or --from-data (the run's test split)")
    if a.data and not a.from_data:
        raise UserError("--data names the split that --from-data reads; add --from-data")
    if not 1 <= a.n <= 64:
        raise UserError(f"--n {a.n}: captions taken with --from-data must be between 1 and 64")
    empty = [i for i, t in enumerate(a.text) if not t.strip()]
    if empty:
        raise UserError(f"--text number {empty[0] + 1} is empty; give each --text a caption")
    if not 1 <= a.num <= 64:
        raise UserError(f"--num {a.num}: images per caption must be between 1 and 64")
    check_output_path(a.out, "--out", (".png",))
    run = load_run(a.run)
    if a.from_data:
        from .from_data import captions_from_split

        a.text, emb = captions_from_split(run, a.data, a.n)
    elif a.embeddings:
        emb = torch.from_numpy(_load_embeddings(a.embeddings, run.model_config.text_dim))
        a.text = [f"embedding {i} of {os.path.basename(a.embeddings)}" for i in range(emb.shape[0])]
    else:
        spec = a.encoder or run.text_encoder
        if not spec:
            raise UserError(f"{run.path} does not record its text encoder: name it with --encoder")
        enc = make_encoder(spec, dim=run.model_config.text_dim)
        emb = torch.from_numpy(enc.encode(a.text))
    if emb.shape[1] != run.model_config.text_dim:
        raise UserError(f"encoder gives {emb.shape[1]}-d embeddings, model expects {run.model_config.text_dim}")
    g = torch.Generator().manual_seed(a.seed)
    rows = []
    for i in range(len(a.text)):
        t = emb[i:i + 1].repeat(a.num, 1)
        z = torch.randn(a.num, run.model_config.z_dim if run.stage == 1 else run.G1.z_dim, generator=g)
        s1, s2 = generate(run, t, z)
        rows.append(to_uint8(s1))
        if s2 is not None:
            rows.append(to_uint8(s2))
    size = 256 if run.stage == 2 else 64
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    labels = ["Stage-I", "Stage-II"] if run.stage == 2 else ["Stage-I"]
    save_png(labelled_grid(rows, a.text, labels, size=size), a.out)
    captions_file = os.path.splitext(a.out)[0] + ".captions.json"  # the captions beside the grid, in order
    with open(captions_file, "w", encoding="utf-8") as f:
        json.dump({"captions": a.text, "rows": labels, "num": a.num, "seed": a.seed}, f, indent=1)
    print(json.dumps({"out": a.out, "captions_file": captions_file, "checkpoint": run.path, "step": run.step,
                      "captions": a.text,
                      "rows": "stage-I, stage-II per caption" if run.stage == 2 else "stage-I per caption"}))
    return 0


def _cmd_eval(a) -> int:
    from .evaluation.run_eval import evaluate

    res = evaluate(a.run, a.data, a.metrics, a.num_samples, a.inception_weights, a.out, a.batch_size, a.stage,
                   a.seed)
    if res is not None:  # rank 0 under torchrun
        print(json.dumps(res, indent=1))
    return 0


def _cmd_report(a) -> int:
    from .observability.report import make_report

    print(json.dumps(make_report(a.run, a.out)))
    return 0


def _cmd_sweep(a) -> int:
    from .sweep.cli import main as sweep_main

    return sweep_main(a.args)


def _cmd_inspect(a) -> int:
    from .inference import inspect

    print(json.dumps(inspect(a.run), indent=1))
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("stackgan_dist")
    except Exception:  # noqa: BLE001 -- run from a source tree without an install
        return "unknown (not installed)"


class _Help(argparse.HelpFormatter):
    """One help style for every subcommand: ``(default: X)`` after an option's help when it has a default
    worth showing and its help does not state one already (a help that depends on the machine says
    ``default: auto (...)`` itself), so no option shows two defaults and none shows ``None`` or ``False``."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        unset = d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, (str, list)) and not d)
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser: its errors print its own usage (``stackgan train ...``), not the top level's;
    its help uses _Help; a missing-arguments error names only the required ones (argparse also lists
    optional positionals such as train's ``overrides``)."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = _Help
        super().__init__(*args, **kwargs)

    def error(self, message):
        prefix = "the following arguments are required: "
        if message.startswith(prefix):
            optional = {a.dest for a in self._actions if not a.option_strings and a.nargs in ("*", "?")}
            optional |= {a.metavar for a in self._actions if not a.option_strings and a.nargs in ("*", "?")}
            names = [n for n in message[len(prefix):].split(", ") if n not in optional]
            message = prefix + ", ".join(names)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    fmt = _Help  # every option's help shows its default, one way (subparsers get it from _SubParser)
    p = argparse.ArgumentParser(prog="stackgan", description="Distributed StackGAN training", formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_SubParser,
                           help="prepare | train | sample | eval | inspect | report | sweep (COMMAND --help for its options)")
    sub.required = True

    pp = sub.add_parser("prepare", help="write WebDataset shards + dataset.json", formatter_class=fmt)
    psub = pp.add_subparsers(dest="source", metavar="SOURCE", parser_class=_SubParser)
    psub.required = True
    from .data.prepare import prepare_cli

    prepare_cli.add_parsers(psub, fmt)  # every source has --progress / --no-progress (add_progress_arg)

    pt = sub.add_parser("train", help="train one stage (resumes from RUN/checkpoints when present)",
                        formatter_class=fmt)
    pt.add_argument("config", help="YAML config, e.g. configs/demo/stage1.yaml")
    pt.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=30 run.dir=runs/x")
    pt.add_argument("--fresh", action="store_true", help="start over; refused unless the run directory is empty")
    pt.add_argument("--dry-run", action="store_true", help="run every check a start runs (config, data and its "
                    "text_dim, run dir and lock, resume, batch split, loader share, Stage-I checkpoint, precision on "
                    "the device), print the start plan as JSON, write nothing")
    pt.add_argument("--device", choices=("cpu", "cuda"), default="",
                    help="the same as train.device=...; with --dry-run cuda plans a CUDA run on a host without "
                    "one (every check but the device itself)")
    pt.add_argument("--nodes", type=int, default=None, help="with --dry-run: plan N nodes x --tasks-per-node ranks")
    pt.add_argument("--tasks-per-node", type=int, default=None, help="with --dry-run: ranks per node")
    pt.add_argument("--preset", default="", help="stackgan_dist/presets/NAME.yaml applied before the overrides; "
                    "'authors': the authors' StackGAN-Pytorch code where it differs from the paper")

    pm = sub.add_parser("sample", help="PNG grid for free-text captions", formatter_class=fmt)
    pm.add_argument("run", help="run directory or checkpoint directory")
    pm.add_argument("--text", action="append", default=[], help="a caption (repeat for several)")
    pm.add_argument("--embeddings", default="",
                    help="an (N, text_dim) .npy of precomputed text embeddings instead of --text (models trained "
                         "on the release's char-CNN-RNN embeddings)")
    pm.add_argument("--from-data", action="store_true",
                    help="captions and embeddings of the first --n samples of the run's test split (data.test of "
                         "RUN/config.yaml, or --data): grids labelled with real captions")
    pm.add_argument("--data", default="", help="with --from-data: the split folder to read instead of the run's")
    pm.add_argument("--n", type=int, default=8, help="with --from-data: how many test captions")
    pm.add_argument("--encoder", default="",
                    help="override the run's recorded text encoder, e.g. sentence-transformers:PATH")
    pm.add_argument("--out", default="samples.png", help="PNG path; the captions go beside it as .captions.json")
    pm.add_argument("--num", type=int, default=4, help="images (z draws) per caption")
    pm.add_argument("--seed", type=int, default=0, help="noise seed")

    pe = sub.add_parser("eval", help="caption consistency, IS and FID on held-out captions", formatter_class=fmt)
    pe.add_argument("run", help="run directory or checkpoint directory")
    pe.add_argument("--data", required=True, help="held-out split folder (holding dataset.json)")
    pe.add_argument("--metrics", default="caption", help="comma-separated: caption, fid, is")
    pe.add_argument("--num-samples", type=int, default=0,
                    help="images to generate (the paper: 30000); 0: one per test sample")
    pe.add_argument("--inception-weights", default="",
                    help="local Inception-v3 weights file for fid/is (default $STACKGAN_INCEPTION_WEIGHTS)")
    pe.add_argument("--batch-size", type=int, default=50, help="images per generator call")
    pe.add_argument("--out", default="", help="also write the JSON here (always written to RUN/eval.json)")
    pe.add_argument("--stage", type=int, choices=(1, 2), default=0, help="refuse a checkpoint of the other stage")
    pe.add_argument("--seed", type=int, default=0, help="noise seed (image i uses (seed, i))")

    pr = sub.add_parser("report", help="one PNG: loss curves from metrics.jsonl and the latest sample grid",
                        formatter_class=fmt)
    pr.add_argument("run", help="run directory")
    pr.add_argument("--out", default="", help="default RUN/report.png")

    pw = sub.add_parser("sweep", help="many trials of a config (Slurm array, Ray Tune, local); `sweep report DIR`",
                        add_help=False)  # its own parser (stackgan_dist/sweep/cli.py) reads the rest
    pw.add_argument("args", nargs=argparse.REMAINDER)

    pi = sub.add_parser("inspect", help="JSON: step, stage, validity, params_sha256", formatter_class=fmt)
    pi.add_argument("run", help="run directory, checkpoint directory or RUN/checkpoints/latest")
    return p


def _subparser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the (sub)subcommand that ``args`` came from, for its usage line."""
    p = parser
    for dest in ("cmd", "source"):
        name = getattr(args, dest, None)
        acts = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not name or not acts or name not in acts[0].choices:
            break
        p = acts[0].choices[name]
    return p


COMMANDS = {"prepare": _cmd_prepare, "train": _cmd_train, "sample": _cmd_sample, "eval": _cmd_eval,
            "inspect": _cmd_inspect, "report": _cmd_report, "sweep": _cmd_sweep}


def _flag_as_key(argv: list[str], flag: str) -> str | None:
    """``--max-steps 10`` -> ``train.max_steps=10`` when the flag's dotted form is a config key, else None."""
    from .config_doc import all_keys

    name, _, value = flag[2:].partition("=")
    leaf = name.replace("-", "_")
    keys = [k for k in all_keys() if k.split(".", 1)[1] == leaf or k.replace(".", "_") == leaf]
    if not keys:
        return None
    if not value:
        i = argv.index(flag)
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1] \
            else "VALUE"
    return f"{keys[0]}={value}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line as ``main`` reads it; a bad one exits 2 with the subcommand's usage (SystemExit)."""
    parser = build_parser()
    if argv and argv[0] == "sweep":  # its own parser reads every argument (flags and key=value in any order)
        return argparse.Namespace(cmd="sweep", args=list(argv[1:]))
    args, extra = parser.parse_known_args(argv)
    flags = [x for x in extra if x.startswith("--")]
    takes_overrides = hasattr(args, "overrides")  # train (and commands like it) take key=value overrides
    hints = [h for h in (_flag_as_key(argv, f) for f in flags) if h] if takes_overrides else []
    if hints:  # a config key written as a flag: say how to write it
        _subparser(parser, args).error(
            f"unrecognized arguments: {' '.join(flags)}; config keys are set as key=value: write {' '.join(hints)}")
    if extra:  # key=value overrides may come after flags (`train CONFIG --fresh a=b`)
        if args.cmd == "train" and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:  # the subcommand's usage, which names the flags it does take
            _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a program whose reader went away


def main(argv: list[str] | None = None) -> int:
    process = argv is None  # the process's own command line (process_end.py), not a call from Python code
    if process:
        process_end.begin()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rc = _main(argv)
        sys.stdout.flush()  # inside the try: a reader gone at exit is the same broken pipe
        return process_end.end(rc) if process else rc
    except BrokenPipeError:  # `stackgan ... | head`: the reader has what it wanted; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
        return EXIT_BROKEN_PIPE


def _main(argv: list[str]) -> int:
    if not argv:  # `stackgan` alone: the commands, not "the following arguments are required: cmd"
        build_parser().print_help(sys.stderr)
        return 2
    args = parse_args(argv)
    reset_logging()  # a command run in-process after another starts as in a fresh process
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", ""))
    where = f" (rank {rank})" if rank else ""
    try:
        return COMMANDS[args.cmd](args)
    except (UserError, TransientError) as e:
        return _say(args.cmd, where, e)
    except KeyboardInterrupt:
        print(f"stackgan {args.cmd}: interrupted{where}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Preempted as e:  # checkpointed on a signal: not an error
        return e.exit_code
    except StartupSignal as e:  # SIGTERM / SIGINT before the step loop: promptly, nothing to checkpoint yet
        print(f"stackgan {args.cmd}{where}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except OSError as e:  # an OS failure no layer below named: one line, its exit code by cause (files.os_error)
        if isinstance(e, BrokenPipeError):
            raise  # main(): the reader of stdout went away, exit 141 quietly
        from .checkpoint.files import os_error

        return _say(args.cmd, where, os_error(e, f"{e.filename}" if e.filename else "file system"))


def _say(cmd: str, where: str, e: UserError | TransientError) -> int:
    kind = "error" if isinstance(e, UserError) else "transient error, exiting 75 (requeue)"
    print(f"stackgan {cmd}: {kind}{where}: {e}", file=sys.stderr, flush=True)
    return e.exit_code
