"""The documentation, checked rather than hoped: links resolve, named config keys exist, README's commands
parse, measured figures name a device and a date, and docs/config.md matches the code."""
import glob
import os
import re
import shlex

import pytest

from conftest import REPO
from stackgan_dist import cli, config_doc

DOCS = ["README.md", "CHANGELOG.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
SECTIONS = ("run", "data", "model", "train", "distributed", "checkpoint", "log")
# `section.word` that is a file name, not a config key (model.pt, train.sbatch, data.md ...)
FILE_EXTS = {"py", "md", "pt", "sbatch", "yaml", "yml", "json", "jsonl", "png", "txt", "out", "err", "sh", "tar",
             "npy", "cls", "env", "pickle", "lock"}
KEY = re.compile(r"(?<![\w./-])(" + "|".join(SECTIONS) + r")\.([a-z][a-z0-9_]*)\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _text(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def _prose(text: str) -> str:
    """Markdown without its fenced code blocks (links are not links there)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", _prose(text), flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    text = _text(doc)
    bad = []
    for target in LINK.findall(_prose(text)):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), path)) if path else os.path.join(REPO, doc)
        if not os.path.exists(full):
            bad.append(f"{target} (no such file)")
        elif anchor and full.endswith(".md") and anchor not in _anchors(_text(os.path.relpath(full, REPO))):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{doc}: " + ", ".join(bad)


def test_the_link_check_sees_bad_links():
    assert LINK.findall("see [x](docs/nope.md#a) and ![img](a.png)") == ["docs/nope.md#a", "a.png"]
    assert "exit-codes" in _anchors("## Exit codes\n") and "b" not in _anchors("```\n# b\n```\n")


def named_keys(text: str) -> set[str]:
    return {f"{s}.{k}" for s, k in KEY.findall(text) if k not in FILE_EXTS}


@pytest.mark.parametrize("doc", DOCS)
def test_every_config_key_the_docs_name_exists(doc):
    known = set(config_doc.all_keys())
    unknown = sorted(named_keys(_text(doc)) - known)
    assert not unknown, f"{doc} names config keys that do not exist: {unknown}"


def test_the_key_pattern_finds_keys_and_skips_files():
    found = named_keys("set `train.max_steps=10` and data.train; not model.pt, train.sbatch, torch.distributed.x"
                       " or tests/data.md")
    assert found == {"train.max_steps", "data.train"}


def readme_commands() -> list[str]:
    """Every ``stackgan ...`` line in README's code blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", _text("README.md"), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and os.path.basename(words[0]) == "stackgan":
                out.append(line)
    return out


def test_readme_has_commands_to_check():
    cmds = readme_commands()
    assert any(" train " in c for c in cmds) and any(" prepare " in c for c in cmds), cmds


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_parses(line):
    """Subcommand and flags exist (the real parser, in-process); a train command's config file exists and its
    overrides name real keys."""
    argv = shlex.split(line, comments=True)[1:]
    try:
        args = cli.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`{line}` does not parse (exit {e.code})")
    if args.cmd == "train":
        assert os.path.isfile(os.path.join(REPO, args.config)), f"{line}: no config {args.config}"
        known = set(config_doc.all_keys())
        for o in args.overrides:
            assert o.split("=", 1)[0] in known, f"{line}: unknown key in {o}"


MEASURED = re.compile(r"\b\d+ min \d+ s\b|\b\d+\.\d+\b|\bimg/s\b|samples/s")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
DEVICE = re.compile(r"\b(CPU|GPU|H100|H200|A100)\b")


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, f"no section '{title}'"
    return m.group(1)


def test_readme_results_name_device_and_date():
    rows = [r for r in _section(_text("README.md"), "Results").splitlines()
            if r.startswith("|") and not r.startswith("|---") and not r.startswith("| what")]
    assert rows
    for r in rows:
        if MEASURED.search(r):
            assert DEVICE.search(r) and DATE.search(r), f"a measured figure without device and date: {r}"


@pytest.mark.parametrize("doc", ["README.md", "docs/demo.md"])
def test_wall_times_carry_a_date(doc):
    """A wall time (``12 min 28 s``) is dated on its line or the one beside it."""
    lines = _prose(_text(doc)).splitlines()
    for i, line in enumerate(lines):
        if re.search(r"\b\d+ min \d+ s\b", line):
            near = " ".join(lines[max(0, i - 1):i + 2])
            assert DATE.search(near), f"{doc}: a wall time without a date: {line}"


def test_readme_stays_a_guide():
    text = _text("README.md")
    assert len(text.splitlines()) <= 300
    first_screen = "\n".join(text.splitlines()[:75])  # a newcomer's three paths: install, demo, cluster
    assert "## Install" in first_screen and "make demo" in first_screen and "slurm/pipeline.sh" in first_screen


def test_config_reference_matches_the_code():
    with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as f:
        page = f.read()
    assert page == config_doc.render(), \
        "docs/config.md is stale: python -m stackgan_dist.config_doc > docs/config.md"
    for key in config_doc.all_keys():
        assert f"| `{key}` |" in page
