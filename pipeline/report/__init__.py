"""Results tables: run a set of experiment configs over several seeds and tabulate mean ± std.

`experiments` runs (or reuses) one federated run per (config, seed) and collects each run's
summary.json; `tables` renders them in Markdown with the protocol, seeds and selection rule stated.
"""
