"""The one-client-at-a-time reference implementation of the federated methods.

Tests and benchmarks compare the vectorised engine (pipeline/federated) with it on the same
seed: clients trained one after the other with plain torch modules, as the original research
code does. It is not part of the library: nothing under pipeline/ imports it.
"""
