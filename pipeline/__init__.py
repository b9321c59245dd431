"""Federated multimodal recommenders on Ray."""
