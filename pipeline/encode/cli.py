"""`python -m pipeline encode`: catalogue -> feature store (jobs/encode_items.py runs the same).

    python -m pipeline encode CATALOGUE --out runs/features/NAME [--text-model M] [--image-model M]
    python -m pipeline encode /work/shared/data/movielens-100k-mm --format movielens-mm \\
        --out runs/features/movielens-100k-mm
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.encode.encoders import IMAGE, TEXT, choices


def register(commands) -> argparse.ArgumentParser:
    """Add the `encode` subcommand to an argparse subparsers object."""
    parser = commands.add_parser("encode", help="encode item text and images into a feature store (Ray Data)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.data.loaders import FORMATS

    parser.add_argument("catalogue", type=Path,
                        help="catalogue file (.csv, .tsv, .parquet, .jsonl with item_id, text, image_path) or a "
                             "folder holding catalogue.*; with --format, a dataset folder")
    parser.add_argument("--out", type=Path, required=True, help="feature store directory (a new one, or an "
                                                                    "earlier store with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier feature store in --out")
    parser.add_argument("--format", choices=FORMATS, help="take the catalogue of a dataset read by this loader")
    parser.add_argument("--config", type=Path, help="YAML with EncodeConfig options (flags given here win)")
    parser.add_argument("--text-model", help=f"{' | '.join(choices(TEXT))} (default minilm)")
    parser.add_argument("--image-model", help=f"{' | '.join(choices(IMAGE))} (default efficientnet-lite0)")
    parser.add_argument("--prompt", help="text template with {title}; 'auto' (the model's own: FedMR prompt for "
                                         "CLIP) or 'none'")
    parser.add_argument("--empty-text", choices=["auto", "mean", "missing"],
                        help="empty texts: mean feature, or 'missing' in the prompt (auto: missing with a prompt)")
    parser.add_argument("--batch-size", type=int, help="items per model call (default 32)")
    parser.add_argument("--actors", type=int, help="model actors per modality (default one per GPU, else up to 4 per node)")
    parser.add_argument("--force", action="store_true",
                        help="re-encode even if the store is up to date (replacing it needs --overwrite)")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (items/s are still logged)")
    parser.add_argument("--json", action="store_true", help="print the manifest and figures as one JSON document")


def config_from_args(args):
    """EncodeConfig from --config (if any) with the flags that were given on top."""
    from pipeline.encode.config import EncodeConfig

    overrides = {"text_model": args.text_model, "image_model": args.image_model, "prompt": args.prompt,
                 "empty_text": args.empty_text, "batch_size": args.batch_size, "actors": args.actors}
    if args.config:
        return EncodeConfig.from_yaml(args.config, **overrides)
    return EncodeConfig(**{key: value for key, value in overrides.items() if value is not None})


def run(args) -> int:
    """Run the encode job for parsed arguments; prints a summary (or JSON) and returns 0."""
    from pipeline.data.schema import DataError
    from pipeline.encode.job import encode_items
    from pipeline.encode.store import STORE_OUTPUT
    from pipeline.outputs import check_output

    check_output(args.out, STORE_OUTPUT, inputs=[args.catalogue], overwrite=True)  # before the catalogue loads
    _setup_logging()
    config = config_from_args(args)
    catalogue = args.catalogue
    if args.format:
        from pipeline.data.loaders import load

        from pipeline.encode.catalogue import from_catalogue

        loaded = load(args.format, args.catalogue).catalogue
        if loaded is None:
            raise DataError(args.catalogue, f"the {args.format} loader found no item catalogue here")
        catalogue = from_catalogue(loaded, source=f"{args.format}:{Path(args.catalogue).resolve()}")
    manifest = encode_items(catalogue, args.out, config, force=args.force, progress=not args.no_progress,
                            ray_address=args.ray_address, overwrite=args.overwrite, inputs=[args.catalogue])
    if args.json:
        print(json.dumps(manifest, indent=2, default=str))
    else:
        print(_summary(manifest))
    return 0


def _summary(manifest: dict) -> str:
    lines = [f"feature store {manifest['path']}: {manifest['item_count']} items"
             + (" (reused: inputs unchanged)" if manifest["reused"] else "")]
    for name, info in manifest["modalities"].items():
        bad = ", ".join(f"{info[k]['count']} {k}" for k in ("missing", "corrupt", "empty") if k in info)
        lines.append(f"  {name:5s} {info['dim']:5d}-d  {info['model_id']}  ({bad}; fallback: {info['fallback']})")
    run_info = manifest["run"]
    stages = ", ".join(f"{m} {s['items_per_s']:.1f} items/s" for m, s in run_info["stages"].items())
    lines.append(f"  made in {run_info['seconds']:.1f} s ({run_info['items_per_s']:.1f} items/s; {stages})")
    return "\n".join(lines)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pipeline.encode").setLevel(logging.INFO)
