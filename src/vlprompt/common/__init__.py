"""Small shared pieces every layer uses: atomic file writes (``io``), the cache root (``paths``), file locks
(``locks``), autocast precision (``precision``), torch.distributed helpers (``dist``)."""
