"""``hhlink assemble``: linked/ and the payload into research/ (tables, mobility measures, sensitivity)."""

from linkage.assemble.stage import assemble

__all__ = ["assemble"]
