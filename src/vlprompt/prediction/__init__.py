"""Prediction: a learned prompt or a zero-shot class list applied to new images (``predictor``), and the nearest
vocabulary words of learned context vectors (``interpret``)."""
