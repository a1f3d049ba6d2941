"""FOUND head training (dncut found-train) — entrypoint for `ray job submit`.

    ray job submit --working-dir . -- python jobs/found_train.py --config configs/<x>.yaml [--set key=value ...]

Only parses the command line and calls `dncut.cli` (`dncut found-train --help` lists the options).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds dncut/

from dncut.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["found-train", *sys.argv[1:]]))
