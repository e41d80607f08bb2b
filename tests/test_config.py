"""The typed configuration and the schema files."""

from __future__ import annotations

import pytest

from linkage.config import DEFAULT_CONFIG_PATH, Config, load_config
from linkage.errors import ConfigError, SchemaError
from linkage.schemas import IDENTIFIER_ROLES, SOURCES, load_schema


def test_default_file_matches_model_defaults():
    # hhlink.toml restates every default: a drift between the two is a bug in one of them
    # (values only: a loaded config also remembers its file, which Config() has not)
    assert load_config(DEFAULT_CONFIG_PATH).model_dump() == Config().model_dump()


def test_every_config_field_is_documented():
    import linkage.config as module

    def walk(model):
        for name, field in model.model_fields.items():
            yield model, name
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from walk(ann)

    for model, name in walk(Config):
        assert f"{name}:" in (model.__doc__ or ""), f"{model.__name__}.{name} is not documented"
    assert module.__doc__


def test_overrides_are_validated():
    with pytest.raises(ConfigError, match="generate.persons"):
        load_config(generate={"persons": 0})
    assert load_config(generate={"persons": 10, "seed": None}).generate.seed == 42


def test_years_must_span_childhood_and_adulthood(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(DEFAULT_CONFIG_PATH.read_text().replace("end_year = 2025", "end_year = 2005"))
    with pytest.raises(ConfigError, match="end_year"):
        load_config(cfg)


@pytest.mark.parametrize("source", SOURCES)
def test_schemas_declare_roles_and_types(source):
    schema = load_schema(source)
    assert schema.source == source
    roles = {c.role for c in schema.columns}
    assert {"record_id", "first_name", "surname", "dob"} <= roles
    assert roles & IDENTIFIER_ROLES and "attribute" in roles


def test_malformed_schema_is_refused(tmp_path):
    (tmp_path / "education.toml").write_text(
        'source = "education"\nversion = "1"\n[[columns]]\nname = "x"\ntype = "blob"\nrole = "attribute"\nnullable = true\n')
    with pytest.raises(SchemaError, match="unknown type 'blob'"):
        load_schema("education", tmp_path)
    with pytest.raises(SchemaError, match="not found"):
        load_schema("benefits", tmp_path)


# --- issue 14 item 6: nothing accepted silently ------------------------------------------------

@pytest.mark.parametrize("text, key, message", [
    ('[flow]\ntimezone = "Mars/Olympus"\n', "flow", "timezone 'Mars/Olympus' is not an IANA time zone"),
    ('[disclosure]\nperturb = "yes"\n', "disclosure", "perturb must be true or false (a TOML boolean), not 'yes'"),
    ('[ingest]\ndata_docs = 1\n', "ingest", "data_docs must be true or false"),
    ('[link]\nkeep_pairs_above = 0.9999\n', "link", "keep_pairs_above (0.9999) must be below threshold (0.999)"),
    ('[link]\nthreshold = 0.5\nkeep_pairs_above = 0.5\n', "link", "keep_pairs_above (0.5) must be below threshold (0.5)"),
    ('[assemble]\nla_lookup = "no/such/lookup.csv"\n', "assemble.la_lookup", "file not found"),
    ("", "", "the config file sets nothing (no section)"),
    ("# only a comment\n", "", "the config file sets nothing"),
])
def test_a_bad_or_empty_config_is_one_line_naming_the_key(tmp_path, text, key, message):
    cfg = tmp_path / "hhlink.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    got = str(err.value)
    assert got.startswith(f"{cfg}: {key}") and message in got and "\n" not in got, got


def test_valid_timezones_and_booleans_pass(tmp_path):
    cfg = tmp_path / "hhlink.toml"
    cfg.write_text('[flow]\ntimezone = "America/New_York"\n[disclosure]\nperturb = false\n')
    c = load_config(cfg)
    assert (c.flow.timezone, c.disclosure.perturb) == ("America/New_York", False)


def test_defaulted_sections_are_named_by_hhlink_config(tmp_path, run_cli):
    cfg = tmp_path / "hhlink.toml"
    cfg.write_text('[generate]\npersons = 100\n')
    assert load_config(cfg).defaulted_sections == ("link", "pseudonymise", "ingest", "paths", "assemble",
                                                   "disclosure", "flow", "service")
    assert load_config().defaulted_sections == ()          # the shipped file states every section
    code, out, err = run_cli("config", "--config", str(cfg))
    assert code == 0, err
    assert "# not in the file, every value the default: [link], [pseudonymise], [ingest], [paths], [assemble], " \
           "[disclosure], [flow], [service]" in out
