"""``hhlink pseudonymise``: staged/ into pseudonymised/ (identifiers, payload, encrypted crosswalk)."""

from linkage.pseudonymise.stage import pseudonymise

__all__ = ["pseudonymise"]
