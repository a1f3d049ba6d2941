"""The ``dncut`` command line as a user meets it: help texts and config errors, via subprocess.

Every case runs the real entry point (``python -m dncut.cli``, plus the installed ``dncut``
script once) and fails before any Ray work: ``RAY_ADDRESS`` points at a closed port, so a
command that got past config validation would fail with a connection error instead of the
config message asserted here (and would take far longer than the timeout allows).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "configs/train/smoke.yaml"
TIMEOUT_S = 60


def dncut(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m dncut.cli ARGS`` in the repo root; never reaches a Ray cluster."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dncut.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def _output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- help


def test_top_level_help_lists_every_command():
    """Every subcommand of the parser, with its description and its example, and nothing hand-listed."""
    from dncut.cli import COMMANDS

    proc = dncut("--help")
    assert proc.returncode == 0, _output(proc)
    assert len(COMMANDS) == 12
    for command, (_, example) in COMMANDS.items():
        assert f"\n    {command}" in proc.stdout, command
        assert example in proc.stdout, example
    assert "--set key.sub=value" in proc.stdout  # the override syntax is explained up front
    assert "``" not in proc.stdout  # plain text, no reStructuredText


def test_every_command_page_has_its_one_line_description_and_example(capsys):
    from dncut.cli import COMMANDS, build_parser

    for command, (description, example) in COMMANDS.items():
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        page = capsys.readouterr().out
        assert " ".join(page.split()).count(" ".join(description.split())) == 1, command
        assert f"example:\n  {example}" in page, command
        assert "\n" not in description, command


def test_backbones_table_lists_every_registered_backbone_with_its_facts():
    """``dncut backbones`` prints the one table; its rows agree with what the built networks say."""
    from dncut.backbones import create_backbone

    proc = dncut("backbones")
    assert proc.returncode == 0, _output(proc)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| name")}
    assert "resnet50_s32" in rows and "efficientnet_lite0_s16" in rows and "vit_small_patch16_224.dino" in rows
    for name in ("vit_tiny_test", "efficientnet_lite0_s16", "resnet50_s32"):
        net = create_backbone(name)
        assert rows[name][:2] == [str(net.stride), str(net.channels)], name
    assert rows["efficientnet_lite0"][3:5] == ["(0.498, 0.498, 0.498)", "(0.502, 0.502, 0.502)"]
    assert "wheel" in rows["efficientnet_lite0"][-1]


@pytest.mark.parametrize("command, expected", [
    ("train", ["--config", "--set", "--address", "override a config key"]),
    ("tune", ["--config", "--set"]),
    ("eval", ["--config", "--set"]),
    ("demo", ["--config", "train/demo", "--quiet", "--verbose"]),
    ("report", ["RUN", "--out"]),
    ("eval-maps", ["--masks", "--maps", "--out"]),
    ("eval-saliency", ["--images", "--masks", "--backbone", "--method", "--bilateral"]),
])
def test_subcommand_help(command, expected):
    proc = dncut(command, "--help")
    assert proc.returncode == 0, _output(proc)
    assert proc.stdout.startswith(f"usage: dncut {command}")
    for text in expected:
        assert text in proc.stdout, f"{command} --help lacks {text!r}:\n{proc.stdout}"


def test_installed_script_matches_module():
    script = shutil.which("dncut", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the dncut console script is not installed next to this python")
    proc = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0 and proc.stdout == dncut("train", "--help").stdout


def test_no_command_is_a_usage_error():
    proc = dncut()
    assert proc.returncode == 2
    assert "usage: dncut" in proc.stderr and "COMMAND" in proc.stderr


def test_unknown_command_names_the_choices():
    proc = dncut("trian")
    assert proc.returncode == 2
    assert "invalid choice: 'trian'" in proc.stderr and "train" in proc.stderr


# ----------------------------------------------------------------------------- config errors


def test_misspelt_key_names_it_and_suggests(tmp_path):
    out_dir = tmp_path / "never"
    proc = dncut("train", "--config", SMOKE, "--set", "model.backbon=x", "--set", f"output_dir={out_dir}")
    assert proc.returncode != 0
    err = _output(proc)
    assert "model.backbon" in err and "did you mean 'backbone'" in err
    assert "Traceback" not in err  # a message, not a stack trace
    assert not out_dir.exists(), "nothing may be written before the config validates"


def test_wrong_type_names_the_key_and_value():
    proc = dncut("train", "--config", SMOKE, "--set", "train.batch_size=abc")
    assert proc.returncode != 0
    err = _output(proc)
    assert "train.batch_size" in err and "'abc'" in err and "integer" in err
    assert "Traceback" not in err


def test_every_error_is_reported_with_valid_choices():
    proc = dncut("train", "--config", SMOKE, "--set", "ncut.affinity=reul", "--set", "data.crop_sise=64",
                 "--set", "model.backbone=efficientnet_lite")
    assert proc.returncode != 0
    err = _output(proc)
    assert "ncut.affinity" in err and "'reul'" in err and "'relu'" in err and "'binary'" in err
    assert "data.crop_sise" in err and "did you mean 'crop_size'" in err
    assert "model.backbone" in err and "did you mean 'efficientnet_lite0'" in err


def test_override_without_equals_sign():
    proc = dncut("train", "--config", SMOKE, "--set", "train.max_steps")
    assert proc.returncode != 0
    assert "key.sub=value" in _output(proc)


@pytest.mark.parametrize("command, content, expected", [
    ("train", None, ["cannot read config"]),  # no such file
    ("eval", "train: {max_steps: 3\nloss: [\n", ["invalid YAML"]),
    ("tune", "trian:\n  max_steps: 3\n", ["trian", "did you mean 'train'"]),
], ids=["missing", "invalid-yaml", "unknown-section"])
def test_bad_config_file(tmp_path, command, content, expected):
    cfg = tmp_path / "c.yaml"
    if content is not None:
        cfg.write_text(content)
    proc = dncut(command, "--config", str(cfg))
    assert proc.returncode != 0
    err = _output(proc)
    assert all(e in err for e in expected), err
    assert str(cfg) in err  # the file is named
    assert "Traceback" not in err


def test_every_option_of_every_command_has_help():
    import argparse

    from dncut.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    walk(p, f"{name} {sub}")
            elif action.dest != "help" and not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "dncut")
    assert not missing, missing


def test_without_a_terminal_progress_is_one_line_at_most_every_30_s():
    """``setup_console`` (default verbosity, stdout a pipe) in a fresh process, then Ray Data's own
    non-terminal progress manager driven by a fake clock: one ``progress: <done>/<total> rows`` line per
    ``PROGRESS_EVERY_S``, none of Ray's banner or operator lines. (dncut sets Ray Data's public
    variable before Ray Data loads; it touches none of Ray Data's classes.)"""
    script = """
import json, logging
from dncut.cli import PROGRESS_EVERY_S, setup_console
setup_console(quiet=False, verbose=False)
from ray.data._internal.progress import logging_progress  # the test drives Ray Data's manager itself
records = []
sink = logging.Handler()
sink.emit = lambda record: records.append(record.getMessage())
logging.getLogger(logging_progress.__name__).addHandler(sink)
now = [1000.0]
manager = logging_progress.LoggingExecutionProgressManager("ds", {}, False, False, _get_time=lambda: now[0])
manager.update_total_progress(5, 10)
for t in (0, 10, PROGRESS_EVERY_S - 1, PROGRESS_EVERY_S + 1, 2 * PROGRESS_EVERY_S + 2):
    now[0] = 1000.0 + t
    manager.refresh()
    manager.update_total_progress(1, 10)
print("RECORDS " + json.dumps([PROGRESS_EVERY_S, records]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "TQDM_DISABLE")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RECORDS ")]
    assert line, proc.stderr[-2000:]
    every, records = json.loads(line[0][len("RECORDS "):])
    assert every == 30
    assert records == ["progress: 5/10 rows", "progress: 8/10 rows", "progress: 9/10 rows"], records
