"""Training: the typed recipe (``config``: TrainConfig) and the one flat SGD loop (``loop``)."""
