"""A thin shim: metadata lives in setup.cfg.

The one thing here is the optional C speedup (``blockws._speedups``, masking).
It is built when a compiler is present; if building fails, blockws installs
without it and uses the pure-Python code, which stays complete and tested.
Set ``BLOCKWS_NO_SPEEDUPS=1`` to skip it on purpose.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing when the extension cannot build."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers, ...
            self.warn(f"blockws: C speedups not built ({exc}); using pure Python")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self.warn(f"blockws: C speedups not built ({exc}); using pure Python")


ext_modules = []
if not os.environ.get("BLOCKWS_NO_SPEEDUPS"):
    ext_modules.append(
        Extension(
            "blockws._speedups", ["blockws/_speedups.c"], optional=True, extra_compile_args=["-O2"]
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
