"""The package version: the one place it is written (pyproject.toml reads it for the built wheel and sdist)."""

__version__ = "0.2.0"
