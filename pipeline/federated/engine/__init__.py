"""The clients' side of a round, where their state lives (no Ray here): local SGD of many clients
at once (client.py) on the rows the sampler draws (sampling.py), a pool's users and their
personal state (shard.py, state.py), evaluation as matrix products (scoring.py)."""
