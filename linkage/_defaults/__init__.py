"""hhlink's shipped defaults: ``hhlink.toml``, ``schemas/``, ``expectations/`` and ``gx/``.

In the repository these entries are symbolic links to the top-level files and folders, so the
top-level layout stays the one people edit; building a wheel copies the files they point to.
Read them through :mod:`linkage.resources`, never by path.
"""
