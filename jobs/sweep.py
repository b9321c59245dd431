"""Ray job: a hyper-parameter sweep, for
`ray job submit --working-dir . -- python jobs/sweep.py --space configs/sweeps/... --name ...`.

A thin wrapper: exactly `python -m pipeline sweep ...`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds `pipeline` and `tune`

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
