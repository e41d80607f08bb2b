"""The u of the context-keyed name levels: measured by the pseudonymiser on a sample in one context, used by link."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter

import duckdb
import pytest

from linkage.config import load_config
from linkage.keys import ENV_KEY, ENV_KEY_FILE
from linkage.link.model import CONTEXT_COMPARISONS, model_settings
from linkage.link.stage import LinkError, context_u
from linkage.pseudonymise.context_u import SAMPLE_ROWS, sample_sql
from linkage.pseudonymise.stage import CONTEXT_ROLES, plan_sources, pseudonymise
from linkage.schemas import SOURCES
from tests.conftest import copy_workspace

SECRET = hashlib.sha256(b"hhlink context-u test key").digest()     # a fixed test key, generated here
CFG = load_config()


@pytest.fixture(scope="module")
def zone(ingested_5k, tmp_path_factory):
    root = copy_workspace(ingested_5k[0], tmp_path_factory.mktemp("ctxu") / "ws")
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_KEY, SECRET.hex())
    mp.delenv(ENV_KEY_FILE, raising=False)
    pseudonymise(CFG, root)
    yield root
    mp.undo()


def _norm(v: str | None) -> str | None:
    v = " ".join(unicodedata.normalize("NFC", v).upper().split()) if v else None
    return v or None


def test_measured_u_is_the_share_of_agreeing_pairs_in_the_sample_and_holds_no_value(zone):
    """The exact-forename and exact-surname u equal the share of the sample's pairs whose cleartext
    names are equal (the sample redrawn here from the staged rows, by the same seed); the shares
    are a few in a thousand, not the third a random sample of pairs in one date context gives."""
    meta = json.loads((zone / "pseudonymised" / "metadata.json").read_text())
    measured = meta["context_u"]
    assert set(measured["comparisons"]) == set(CONTEXT_COMPARISONS)
    assert measured["rows"] == SAMPLE_ROWS and measured["pairs"] == SAMPLE_ROWS * (SAMPLE_ROWS - 1) // 2
    for shares in measured["comparisons"].values():
        assert sum(shares.values()) == pytest.approx(1.0)
    plans = plan_sources(CFG, zone / "staged")
    assert {p.name for p in plans} == set(SOURCES)
    con = duckdb.connect()
    sample = con.sql(sample_sql(plans, CONTEXT_ROLES, CFG.link.seed)).fetchall()
    assert len(sample) == SAMPLE_ROWS
    for column, comparison, label in ((0, "forename", "Exact match on fn_tok"), (1, "surname", "Exact match on sn_tok")):
        names = [_norm(row[column]) for row in sample]
        present = [n for n in names if n]
        pairs = len(present) * (len(present) - 1) // 2
        equal = sum(c * (c - 1) // 2 for c in Counter(present).values())
        assert measured["comparisons"][comparison][label] == pytest.approx(equal / pairs, rel=1e-12)
        assert 0 < equal / pairs < 0.05
    # shares only: no token, filter or name of the sample in the metadata
    text = json.dumps(measured)
    assert not any(n and n in text for n in {_norm(r[0]) for r in sample} | {_norm(r[1]) for r in sample})


def test_link_sets_the_measured_u_and_refuses_a_zone_without_them():
    settings = model_settings().create_settings_dict("duckdb")
    measured = {"comparisons": {"forename": {"Exact match on fn_tok": 0.004, "same initial": 0.06},
                                "sex": {"Exact match on sex_tok": 0.5},
                                "dob": {"Exact match on dob_tok": 0.9}}}        # not context-keyed: ignored
    done = context_u(settings, measured)
    assert done == ["forename: Exact match on fn_tok", "forename: same initial", "sex: Exact match on sex_tok"]
    levels = {(c["output_column_name"], lv["label_for_charts"]): lv for c in settings["comparisons"]
              for lv in c["comparison_levels"]}
    assert levels[("forename", "Exact match on fn_tok")]["u_probability"] == 0.004
    assert levels[("sex", "Exact match on sex_tok")]["u_probability"] == 0.5
    assert "u_probability" not in levels[("dob", "Exact match on dob_tok")] or \
        levels[("dob", "Exact match on dob_tok")]["u_probability"] != 0.9
    with pytest.raises(LinkError, match="context_u"):
        context_u(model_settings().create_settings_dict("duckdb"), None)
