"""Pixels in, scores and maps out: preprocessing, the weights (loaded as data), the classifier's
backends and the class activation maps."""
