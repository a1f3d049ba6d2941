"""Pick the finetuning recipe on real photos with a short ``dncut tune`` sweep (``configs/sweep/bsds.yaml``).

Splits ``shared/data/sod-val`` by sorted name into a TUNE half (first 50: the sweep's
``data.val``, linked under ``outputs/sod-val-tune``) and a HELD-OUT half (the other 50, scored only
by ``bench/finetune_quality.py``), runs the sweep on the 200 BSDS photos, and copies its table,
CSV and plot to ``bench/results/recipe_sweep/``::

    python bench/recipe_sweep.py [--set tune.lr=[3e-4] ...]

Exits with a message (status 2) when the data folders are absent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

SHARED = Path(os.environ.get("DNCUT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TUNE_HALF = 50  # images of sod-val (sorted by name) the sweep may look at
OUT = Path(__file__).parent / "results" / "recipe_sweep"


def sod_val_split(root: Path) -> tuple[list[str], list[str]]:
    """(tune stems, held-out stems) of a saliency folder: the first ``TUNE_HALF`` image names, sorted, and the rest."""
    stems = sorted(p.stem for p in (root / "images").iterdir())
    return stems[:TUNE_HALF], stems[TUNE_HALF:]


def link_tune_half(root: Path, link_dir: Path) -> None:
    """Link the tune half of ``root`` as ``link_dir/{images,masks}`` (the sweep's ``data.val``)."""
    tune, _ = sod_val_split(root)
    for sub in ("images", "masks"):
        (link_dir / sub).mkdir(parents=True, exist_ok=True)
        for path in (root / sub).iterdir():
            target = link_dir / sub / path.name
            if path.stem in tune and not target.exists():
                target.symlink_to(path.resolve())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if not (SHARED / "sod-val" / "images").is_dir() or not (SHARED / "bsds-unlabeled").is_dir():
        print(f"recipe_sweep: no sod-val / bsds-unlabeled under {SHARED} (set DNCUT_SHARED_DATA)", file=sys.stderr)
        raise SystemExit(2)
    tune_dir = Path("outputs/sod-val-tune").resolve()
    link_tune_half(SHARED / "sod-val", tune_dir)

    from dncut.cli import init_ray
    from dncut.config import load_config
    from dncut.tune import run_sweep

    cfg = load_config("configs/sweep/bsds.yaml", [f"data.train={(SHARED / 'bsds-unlabeled').resolve()}",
                                                 f"data.val={tune_dir}", *args.overrides])
    init_ray()
    results = run_sweep(cfg)
    OUT.mkdir(parents=True, exist_ok=True)
    for uri in (results.files or {}).values():
        if uri and os.path.isfile(uri) and not uri.endswith((".json", ".pth")):
            shutil.copy(uri, OUT / os.path.basename(uri))
    print(results.table)


if __name__ == "__main__":
    main()
