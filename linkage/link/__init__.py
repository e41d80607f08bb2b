"""``hhlink link``: pseudonymised/identifiers/ into linked/ (persons, households) and the linkage report."""

from linkage.link.stage import link

__all__ = ["link"]
