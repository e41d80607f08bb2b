"""``hhlink link-files``: a data engineer's own extracts pseudonymised and linked with the project's encodings."""

from linkage.link_files.stage import link_files

__all__ = ["link_files"]
