"""The centralized upper bound: the federated models trained on pooled data, with Ray Train."""
