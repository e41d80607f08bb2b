"""Keep pyspark 4 from ending ``python -c`` runs that import Great Expectations.

When its Spark Connect dependencies (grpcio, ...) are missing, ``pyspark.sql.connect``
decides at import time whether it is being run as a doctest: if ``__main__`` has neither
``__file__`` nor ``__spec__`` and ``sys.ps1`` is unset, it prints "Skipping doctests" and
calls ``sys.exit(0)``. That is exactly the state of ``python -c "..."``, and Great
Expectations imports ``pyspark.sql.connect`` when pyspark is installed (the ``spark``
extra), so ``python -c "from linkage.ingest.stage import ingest; ingest(...)"`` would stop
silently with status 0 (scripts, ``python -m`` and the ``hhlink`` command are unaffected).

In that state only, :func:`install` adds an import hook that runs the import of
``pyspark.sql.connect`` with ``sys.ps1`` set, so pyspark raises its ordinary ImportError
(which Great Expectations handles) instead of exiting. Nothing else changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_PACKAGE = "pyspark.sql.connect"


class _Loader(importlib.abc.Loader):
    """Run the wrapped loader with ``sys.ps1`` set, so pyspark does not take the run for a doctest."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        had_ps1 = hasattr(sys, "ps1")
        if not had_ps1:
            sys.ps1 = ""
        try:
            self._inner.exec_module(module)
        finally:
            if not had_ps1:
                del sys.ps1


class _Finder(importlib.abc.MetaPathFinder):
    """Find ``pyspark.sql.connect`` as usual, but load it through :class:`_Loader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _PACKAGE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def _looks_like_a_doctest_to_pyspark() -> bool:
    main = sys.modules.get("__main__")
    return (main is not None and getattr(main, "__spec__", None) is None and not hasattr(main, "__file__")
            and not hasattr(sys, "ps1"))


def install() -> None:
    """Add the import hook, once, when ``__main__`` looks like a doctest to pyspark (``python -c``)."""
    if _looks_like_a_doctest_to_pyspark() and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
