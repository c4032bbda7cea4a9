"""Benchmarks for the bootstrap server: figures to read, never pass/fail on time.

``python -m bench`` (or ``make bench``) runs every phase of issue 8's table; ``--smoke`` runs a
tiny version that only proves the suite works. See bench/README.md.
"""

__all__: list[str] = []
