"""The documents cannot go stale: README size, command lists, method and backbone lists, the commands
they show, their links; and bench/ holds benchmarks that name their command and output.

Sources of truth: the parser (``dncut.cli.build_parser``, ``dncut.cli.COMMANDS``), the config's
choices (``typing.get_args(dncut.config.EvalMethod)``) and the backbone table
(``dncut.backbone_specs.SPECS``). No Ray, no network: seconds.
"""

from __future__ import annotations

import ast
import re
import shlex
import typing
from pathlib import Path

import pytest

from dncut.backbone_specs import SPECS
from dncut.cli import COMMANDS, build_parser
from dncut.config import EvalMethod, resolve_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_LIMIT = 15_000
BENCH_SHARED = {"__init__.py", "corpus.py", "s3server.py"}  # fixtures the benches share with the tests


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)


def _dncut_lines(text: str) -> list[str]:
    """Every ``dncut ...`` command of the page's shell blocks, continuation lines joined, comments cut."""
    lines = []
    for block in _code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            line = re.sub(r"^(\.venv/bin/)?dncut ", "dncut ", line)
            if line.startswith("dncut "):
                lines.append(line)
    return lines


def test_readme_is_a_short_users_page():
    assert len(README.read_text()) <= README_LIMIT, f"README.md: {len(README.read_text())} > {README_LIMIT} characters"
    assert {"docs/results.md", "docs/benchmarks.md", "docs/operations.md"} <= {
        str(p.relative_to(ROOT)) for p in DOCS}


def test_commands_table_is_the_parsers_list():
    """The README's command table, ``COMMANDS`` and the subcommands argparse prints are one list."""
    section = README.read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `dncut ([a-z-]+)` \|", section, re.M)
    assert listed == list(COMMANDS), f"README lists {listed}, the parser has {list(COMMANDS)}"
    help_text = build_parser().format_help()
    block = help_text.split("COMMAND\n", 1)[1].split("\noptions:", 1)[0]
    printed = re.findall(r"^    ([a-z][a-z-]*)", block, re.M)
    assert printed == list(COMMANDS)
    for name, (_, example) in COMMANDS.items():  # the epilog's examples, one per command
        assert f"  {example}\n" in help_text + "\n", name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_dncut_command_shown_parses_and_its_config_exists(page):
    parser = build_parser()
    lines = _dncut_lines(page.read_text())
    if page == README:
        assert {line.split()[1] for line in lines} >= {"train", "tune", "eval", "eval-saliency", "eval-maps",
                                                      "predict", "export"}
    for line in lines:
        argv = shlex.split(line)[1:]
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page.name}: `{line}` does not parse")
        if getattr(args, "config", None):
            from dncut.cli import CONFIG_KIND

            resolved = resolve_config(args.config, CONFIG_KIND.get(args.command))
            assert Path(resolved).is_file() or (ROOT / resolved).is_file(), f"{page.name}: `{line}`: no {resolved}"


def test_examples_in_help_parse():
    parser = build_parser()
    for name, (_, example) in COMMANDS.items():
        assert parser.parse_args(shlex.split(example)[1:]).command == name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_method_lists_match_the_configs_choices(page):
    """A line that lists the evaluation methods names ``EvalMethod`` and lists exactly its choices."""
    methods = set(typing.get_args(EvalMethod))
    text = page.read_text()
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if "`dncut.config.EvalMethod`" in p]
    if page == README:
        assert paragraphs, "README: no methods list (a paragraph naming `dncut.config.EvalMethod`)"
    for para in paragraphs:
        listed = set(re.findall(r"`([a-z][a-z0-9_-]*)`", para))
        assert listed == methods, f"{page.name}: methods {sorted(listed)} != EvalMethod {sorted(methods)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_backbone_lists_match_the_backbone_table(page):
    """A paragraph starting ``**Backbones**`` lists every registered backbone with its stride, no other."""
    paragraphs = [p for p in re.split(r"\n\s*\n", page.read_text()) if p.startswith("**Backbones**")]
    if page == README:
        assert paragraphs, "README: no **Backbones** list"
    for para in paragraphs:
        listed = dict(re.findall(r"`([\w.]+)`\s*\(s(\d+)\)", para))
        assert listed == {name: str(s.stride) for name, s in SPECS.items()}, (
            f"{page.name}: the backbone list differs from dncut.backbone_specs; paste this:\n{backbones_paragraph()}")


def backbones_paragraph() -> str:
    """The README's backbone list as it should read (sorted names, stride)."""
    items = ", ".join(f"`{name}` (s{SPECS[name].stride})" for name in sorted(SPECS))
    return f"**Backbones** (`dncut backbones`): {items}."


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_named_results_exist(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
    for name in re.findall(r"bench/results/([\w.-]+\.(?:json|md))", text):
        assert (ROOT / "bench" / "results" / name).is_file(), f"{page.name}: names bench/results/{name}, absent"


SOURCES = sorted([*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "dncut").rglob("*.py"), *(ROOT / "jobs").glob("*.py"),
                  *(ROOT / "deploy").rglob("*.yaml"), ROOT / "cluster.yaml"])


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_and_experiment_paths_named_in_configs_and_code_exist(source):
    """Config comments, docstrings and help texts that cite a bench, an experiment or a result name a path
    that exists (they went stale when investigations moved to experiments/ and result variants were deleted)."""
    text = source.read_text()
    for path in re.findall(r"\b((?:bench|experiments)/[\w./-]*[\w/])", text):
        assert (ROOT / path).exists(), f"{source.relative_to(ROOT)}: names {path}, absent"


# ----------------------------------------------------------------------------- bench/


def _bench_scripts() -> list[Path]:
    return sorted(p for p in (ROOT / "bench").iterdir()
                  if p.suffix in (".py", ".sh") and p.name not in BENCH_SHARED)


def test_nothing_under_bench_imports_tests():
    for path in (ROOT / "bench").rglob("*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "tests" or n.startswith("tests.") for n in names), f"{path.name} imports {names}"
        assert not re.search(r"sys\.path\.\w+\(.*[\"']tests[\"']", text), f"{path.name} puts tests/ on sys.path"


@pytest.mark.parametrize("script", _bench_scripts(), ids=lambda p: p.name)
def test_each_bench_states_its_command_and_output(script):
    text = script.read_text()
    if script.suffix == ".py":
        head = ast.get_docstring(ast.parse(text)) or ""
    else:
        head = "\n".join(line for line in text.splitlines()[:30] if line.startswith("#"))
    assert f"bench/{script.name}" in head, f"{script.name}: its docstring shows no command"
    assert "bench/results/" in head or "$OUT" in head, f"{script.name}: its docstring names no output"
    assert not re.search(r"\b[Ii]ssue \d+", head), f"{script.name}: an issue log in the docstring (move it to docs/)"


def test_bench_results_hold_one_current_file_per_bench():
    """Every file under bench/results/ is named by a bench (``ncut_layer_<device>.json`` counts for the
    cpu and cuda files): no ``_tried`` / ``_before`` variants (git keeps those)."""
    sources = "\n".join(p.read_text() for p in _bench_scripts())
    for path in sorted((ROOT / "bench" / "results").iterdir()):
        assert path.is_file(), f"bench/results/{path.name}: a folder (investigations go to experiments/)"
        generic = re.sub(r"_(cpu|cuda)(?=[._])", "_<device>", path.name)
        assert path.name in sources or generic in sources, f"bench/results/{path.name}: no bench writes it"


# --------------------------------------------------------------------------- config usage comments
JOB_COMMANDS = {"train.py": "train", "sweep.py": "tune", "evaluate.py": "eval", "found_train.py": "found-train"}
CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))


def _usage_commands(text: str) -> list[list[str]]:
    """``dncut ...`` and ``python jobs/<x>.py ...`` commands of a config's leading comment, continuation
    lines joined, as the argv ``dncut`` gets (a job's file name mapped to its command)."""
    comment = "\n".join(line[1:] for line in text.splitlines() if line.startswith("#")).replace("\\\n", " ")
    out = []
    for line in comment.splitlines():
        line = line.strip().split(" # ")[0]
        if line.startswith("dncut "):
            out.append(shlex.split(line)[1:])
        elif " -- python jobs/" in line:
            script, *rest = shlex.split(line.split(" -- python jobs/", 1)[1])
            out.append([JOB_COMMANDS[script], *rest])
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_usage_comments_run_up_to_the_start_of_ray(path, monkeypatch):
    """Each command a config's comment shows gets through what ``dncut`` does before Ray starts: the
    parser, then the config file and its ``--set`` overrides, validated (``dncut.cli.load``)."""
    from dncut.cli import load

    monkeypatch.chdir(ROOT)
    for argv in _usage_commands(path.read_text()):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{path.name}: `dncut {shlex.join(argv)}` does not parse")
        cfg = load(args)
        assert cfg is not None, argv
