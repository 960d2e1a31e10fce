"""Pytest setup shared by every test module.

Hypothesis writes nothing into the work tree: no example database (failing
examples are still printed with ``@reproduce_failure`` and the seed), and its other storage (the
``constants`` cache it keeps under ``./.hypothesis``) goes to a folder in the system temp directory.
"""

from __future__ import annotations

import getpass
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"vggnorm-hypothesis-{getpass.getuser()}")
settings.register_profile("vggnorm", database=None)
settings.load_profile("vggnorm")
