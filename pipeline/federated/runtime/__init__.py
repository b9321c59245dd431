"""Ray and files around the round loop: the driver job (run.py), the Server actor (server.py),
the ClientPool actors and their backend (pool.py), where pools go (placement.py), checkpoints
(checkpoints.py) and what the machines are (machine.py)."""
