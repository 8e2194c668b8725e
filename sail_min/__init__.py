"""sail_min: a small, verified reference implementation of SAIL (arXiv 2406.15567)."""

__version__ = "0.1.0"
