"""Pytest setup shared by every test module.

Hypothesis keeps no example database: the default one is a ``.hypothesis`` folder in the working
directory (the work tree), which STYLE.md practice 11 rules out. Failing examples are still printed
with ``@reproduce_failure`` and replayed from the seed pytest reports.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("vggnorm", database=None)
settings.load_profile("vggnorm")
