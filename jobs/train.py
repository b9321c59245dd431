"""Federated training job, for `ray job submit --working-dir . -- python jobs/train.py --config ...`.

A thin wrapper: exactly `python -m pipeline train ...`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds `pipeline`

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
