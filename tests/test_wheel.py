"""The wheel as a user installs it: ``python -m build`` -> a fresh virtualenv outside the repository
-> ``dncut backbones``, ``dncut train`` and ``dncut eval-saliency`` from that install.

The fresh virtualenv gets the wheel itself with ``pip install --no-deps``; its dependencies (torch,
Ray, timm, ...; gigabytes) are borrowed from the test's own environment through a ``.pth`` line
instead of being downloaded again, and ``pip check`` confirms they satisfy the wheel's declared
requirements. The ``.pth`` adds that site-packages as a plain path, so the repository's editable
install (a ``.pth`` hook inside it) is not activated: ``dncut`` is imported from the wheel (asserted).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """``{"bin": venv/bin, "env": environment, "home": a folder outside the repository}``."""
    tmp = tmp_path_factory.mktemp("wheel-venv")
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"),
                           str(ROOT)], capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0 and "No module named build" in proc.stderr:
        pytest.skip("the `build` package is not installed (dev extra)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("dncut-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    bindir = venv / "bin"
    site = Path(_run([str(bindir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                     ).stdout.strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(bindir / "python"), "install", "--no-deps", "-q", str(wheel)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTHON"))}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv))
    home = tmp / "user"
    home.mkdir()
    return {"bin": bindir, "env": env, "home": home, "site": site}


def test_the_wheel_is_what_the_fresh_venv_imports(installed):
    where = _run([str(installed["bin"] / "python"), "-c", "import dncut.cli; print(dncut.cli.__file__)"],
                 cwd=installed["home"], env=installed["env"]).stdout.strip()
    assert Path(where).is_relative_to(installed["site"]) and not Path(where).is_relative_to(ROOT), where
    check = subprocess.run([str(installed["bin"] / "python"), "-m", "pip", "check"], capture_output=True, text=True,
                           cwd=installed["home"], env=installed["env"], timeout=TIMEOUT_S)
    missing = [line for line in check.stdout.splitlines() if line.startswith("dncut ")]
    assert not missing, missing  # every requirement the wheel declares is met


def test_backbones_command_from_the_wheel(installed):
    out = _run([str(installed["bin"] / "dncut"), "backbones"], cwd=installed["home"], env=installed["env"]).stdout
    assert "efficientnet_lite0" in out and "vit_small_patch16_224.dino" in out


@pytest.mark.ray
def test_train_then_eval_saliency_from_the_wheel(installed):
    home, env, dncut = installed["home"], installed["env"], str(installed["bin"] / "dncut")
    _run([dncut, "-q", "train", "--config", "train/smoke", "--set", "train.max_steps=2", "--set", "train.val_every=null",
          "--set", "output_dir=runs"], cwd=home, env=env)  # a bundled config by name: no repository here
    export = home / "runs" / "smoke" / "backbone.pth"
    assert export.is_file()

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (home / "sal" / "images").mkdir(parents=True, exist_ok=True)
        (home / "sal" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(home / "sal" / "images" / f"{name}.jpg")
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        Image.fromarray(mask).save(home / "sal" / "masks" / f"{name}.png")
    out = _run([dncut, "-q", "eval-saliency", "--images", "sal/images", "--masks", "sal/masks", "--backbone",
                "vit_tiny_test", "--checkpoint", str(export), "--method", "simple", "--out", "sal_out",
                "--set", "eval.image_size=64"], cwd=home, env=env).stdout
    assert "simple" in out.lower()
    assert (home / "sal_out").is_dir() and any((home / "sal_out").rglob("summary.json"))
