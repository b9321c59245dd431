"""Item encoding: foundation-model features of item text and images, computed once per catalogue.

    catalogue.py   read / write the stage's input (item_id, text, image_path), content hash
    encoders.py    the encoder interface and registry; minilm.py, efficientnet.py, hf.py, tiny_clip.py
    images.py      decode + resize (PIL)           batching.py   row order for batching
    resources.py   actors / CPUs / GPUs per stage  stage.py      the Ray Data stage
    assemble.py    join on item id, mean fallback  store.py      the feature store (load_features)
    config.py      EncodeConfig                    job.py        encode_items: all of it, end to end
    cli.py         `python -m pipeline encode`

Training reads features only through :func:`pipeline.encode.store.load_features`.
"""
