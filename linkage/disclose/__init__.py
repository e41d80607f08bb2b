"""``hhlink disclose``: research/ into published/ under disclosure control."""

from linkage.disclose.stage import build_table, disclose

__all__ = ["build_table", "disclose"]
