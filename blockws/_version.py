"""blockws's version, in one place (``blockws.__version__`` and the ``User-Agent``)."""

__version__ = "0.1.0"
