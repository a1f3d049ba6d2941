"""Pick the finetuning recipe on real photos with a short ``dncut tune`` sweep (``configs/sweep/bsds.yaml``).

The investigation that chose the demo's recipe (findings: docs/results.md). It links the tune half
of ``shared/data/sod-val`` (first 50 names, ``bench.finetune_quality.link_tune_half``) as the sweep's
``data.val``, runs the sweep on the 200 BSDS photos, and copies its table, CSV and plot to
``experiments/results/recipe_sweep/``. From the repository root::

    .venv/bin/python -m experiments.recipe_sweep [--set tune.lr=[3e-4] ...]

Exits with a message (status 2) when the data folders are absent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from bench.finetune_quality import SHARED, link_tune_half  # sod-val's tune half

OUT = Path(__file__).parent / "results" / "recipe_sweep"


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
