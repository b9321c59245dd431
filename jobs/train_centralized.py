"""Centralized upper-bound job, for
`ray job submit --working-dir . -- python jobs/train_centralized.py --config ...`.

A thin wrapper: exactly `python -m pipeline centralized ...`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds `pipeline`

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["centralized", *sys.argv[1:]]))
