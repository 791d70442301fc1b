"""Frozen image-tower features: extraction with the eval transform and pools of augmented views (``extract``), and
their on-disk SQLite cache (``cache``)."""
