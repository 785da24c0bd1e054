"""Sphinx configuration of the blockws documentation.

Build: ``python -m sphinx -W -b html docs docs/_build/html`` (warnings are errors).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import blockws  # noqa: E402

project = "blockws"
author = "blockws contributors"
copyright = "2026, blockws contributors"  # noqa: A001 - Sphinx's name
version = release = blockws.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx", "sphinx.ext.viewcode"]
# Offline builds: no inventory is fetched; :mod:`ssl` and friends stay plain text.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"blockws {release}"
