"""Ray job: encode an item catalogue into a feature store.

    ray job submit --working-dir . -- python jobs/encode_items.py CATALOGUE --out DIR [options]

A thin wrapper: exactly `python -m pipeline encode ...`. Under `ray job submit` the job joins
the cluster through RAY_ADDRESS; elsewhere it starts a local Ray instance.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds `pipeline`

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
