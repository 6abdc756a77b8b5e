"""darkroom: keep image classifiers fresh in production."""

__version__ = "0.1.0"
