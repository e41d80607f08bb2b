"""Researcher-facing text in words and numbers, never configuration keys.

Descriptions written by the stages may name a setting (``at least
assemble.long_spell_months``); a researcher needs its value ("at least 24 months").
:func:`plain` replaces each ``section.field`` that names a setting of the running config with
its value, worded by the field's kind (months, years, a share as a percentage);
:func:`plain_meta` does it for every description in a data dictionary.

Example:
    >>> from linkage.config import load_config
    >>> cfg = load_config()
    >>> plain("Benefit spells: none, short, or long (at least assemble.long_spell_months)", cfg)
    'Benefit spells: none, short, or long (at least 24 months)'
    >>> plain("On FSM in most school years (assemble.persistent_fsm_share)", cfg)
    'On FSM in most school years (80%)'
    >>> plain("lower bound of the interval of ige (see sdc.uncertainty)", cfg)
    'lower bound of the interval of ige (see the note on confidence intervals)'
"""

from __future__ import annotations

import re

__all__ = ["plain", "plain_meta", "worded"]

_SECTIONS = ("generate", "ingest", "pseudonymise", "link", "assemble", "evaluate", "disclosure", "service", "flow")
_REFERENCE = re.compile(r"\b(" + "|".join(_SECTIONS) + r")\.([a-z][a-z0-9_]*)\b")


def worded(field: str, value: object) -> str:
    """A setting's value as a researcher reads it: ``24 months``, ``80%``, ``5 years``, ``10``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    number = f"{value:,.0f}" if float(value).is_integer() else f"{value:,g}"
    for unit in ("months", "years", "days", "weeks"):
        if field.endswith("_" + unit):
            return f"{number} {unit if value != 1 else unit[:-1]}"
    if field.endswith(("_share", "_rate", "_fraction", "_proportion")) and 0 <= value <= 1:
        return f"{value:.0%}" if round(value * 100, 6).is_integer() else f"{value:.1%}"
    return number


#: references to a dictionary's own metadata keys (``see sdc.uncertainty``), in words
_META = re.compile(r"\bsdc\.([a-z][a-z0-9_]*)\b")
_META_WORDS = {"uncertainty": "the note on confidence intervals"}


def plain(text: str, config) -> str:
    """``text`` with each reference to a setting (``section.field``) replaced by its worded value, and each
    reference to the dictionary's metadata (``sdc.uncertainty``) by the note a researcher reads instead."""

    def value(m: re.Match) -> str:
        section, field = m.groups()
        v = getattr(getattr(config, section, None), field, None)
        return m.group(0) if v is None else worded(field, v)

    if not isinstance(text, str) or "." not in text:
        return text
    text = _REFERENCE.sub(value, text)
    return _META.sub(lambda m: _META_WORDS.get(m.group(1), "the note on disclosure control"), text)


def plain_meta(meta: object, config) -> object:
    """A copy of a data dictionary (nested dicts and lists) with every ``description`` and ``title`` plain."""
    if isinstance(meta, dict):
        return {k: plain(v, config) if k in ("description", "title") and isinstance(v, str) else plain_meta(v, config)
                for k, v in meta.items()}
    if isinstance(meta, list):
        return [plain_meta(v, config) for v in meta]
    return meta
