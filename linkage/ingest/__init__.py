"""``hhlink ingest``: landing/ into staged/ and quarantine/, behind the data-quality gates."""

from linkage.ingest.stage import ingest

__all__ = ["ingest"]
