"""Splink's EM stops on a level whose estimated m (or u) comes out exactly 0.0.

A level observed in an EM session only among pairs the model already scores as certain
non-matches gets m = 0.0 from the maximisation step, and Splink 5 refuses it in the level's
setter (``m_probability value 0.0 is below the minimum allowed value of 1e-300``), ending
training. On the context-keyed encodings of issue 16 the forename level "one name in the
other's place" did so in the NINO session of the 20,000-person demo. An estimate of 0 is
legitimate ("never seen among matches"); here it is kept as the smallest value Splink takes,
and :func:`linkage.link.model.floor_levels` then raises it to the model's floor after training,
as it does for levels training never observed.
"""

from __future__ import annotations

import functools

_SMALLEST = 1e-300


def allow_zero_em_estimates() -> None:
    """Clamp EM estimates of exactly 0.0 to 1e-300 (idempotent)."""
    from splink.internals import expectation_maximisation as em

    original = em.populate_m_u_from_lookup
    if getattr(original, "_hhlink_clamped", False):
        return

    @functools.wraps(original)
    def populate(training_fixed_probabilities, comparison_level, output_column_name, m_u_records_lookup):
        entry = m_u_records_lookup.get(output_column_name, {}).get(comparison_level.comparison_vector_value)
        if entry is not None:
            for which in ("m_probability", "u_probability"):
                if entry.get(which) == 0.0:
                    entry[which] = _SMALLEST
        return original(training_fixed_probabilities, comparison_level, output_column_name, m_u_records_lookup)

    populate._hhlink_clamped = True
    em.populate_m_u_from_lookup = populate
