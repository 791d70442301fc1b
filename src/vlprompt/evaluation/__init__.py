"""Evaluation: metrics of a classifier on image features (``metrics``)."""
