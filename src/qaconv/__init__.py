"""qaconv: generalizable person re-identification by explicit local matching."""

__version__ = "0.1.0"
