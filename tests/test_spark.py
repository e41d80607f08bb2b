"""The Spark engine: Splink's SparkAPI gives the same persons as DuckDB on a small population.

The identifiers zone is built by the real stages (generate, ingest, pseudonymise). DuckDB
links it with the project's settings; Spark then scores the same identifiers with the
model DuckDB trained, so the two engines see identical parameters and must produce
identical person partitions (and identical scored pairs). A second Spark run trains its
own model: its prior and m probabilities must match DuckDB's, and its u probabilities
must lie within sampling error of DuckDB's (the engines draw different random samples,
and on Spark the sample is kept small because local Spark is slow).

pyspark is the ``spark`` extra, which CI installs: without it these tests fail, they
are never skipped. Local Spark is 25-30x slower than DuckDB, so the population is small
(1,500 persons) and one JVM serves most tests; the module ends with no JVM left running.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from linkage.link import spark as spark_engine
from linkage.config import load_config
from linkage.encodings import dice, dice_sql
from linkage.link.stage import link
from linkage.keys import MasterKey
from linkage.pseudonymise.store import read_identifiers
from linkage.link.linked_records import records_relation

KEY = "5e" * 32                       # a fixed test key (hex of 32 bytes)
MASTER = MasterKey(bytes.fromhex(KEY), "test")   # identifiers/ are encrypted at rest: link decrypts them
PERSONS = 1500
SPARK_U_MAX_PAIRS = 3e4               # u sample for Spark training: about 250 identities, all pairs
MARKER = "hhlink: reached the end"


def _require_pyspark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        pytest.fail("pyspark is not installed: the Spark tests need the spark extra "
                    "(pip install -e '.[test,spark]', as 'make test' and CI do)", pytrace=False)


def _java_children() -> list[int]:
    """Process ids of JVMs started by this process (the py4j gateway is a direct child)."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me and b"java" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _copy_identifiers(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "pseudonymised" / "identifiers", dst / "pseudonymised" / "identifiers")
    # the zone's metadata: the measured u of the context-keyed name levels, which link reads
    shutil.copy2(src / "pseudonymised" / "metadata.json", dst / "pseudonymised" / "metadata.json")
    return dst


def _partition(workspace: Path) -> set[frozenset[str]]:
    """Persons as sets of record tokens: independent of how either engine names its clusters."""
    rows = duckdb.sql(f"select list(record_token order by record_token) from "
                      f"{records_relation(workspace / 'linked')} group by person_key").fetchall()
    return {frozenset(r[0]) for r in rows}


def _pairs(partition: set[frozenset[str]]) -> set[tuple[str, str]]:
    return {(a, b) for person in partition for a in person for b in person if a < b}


def _spark_cfg(**link):
    return load_config(link={"engine": "spark", **link})


@pytest.fixture(scope="module", autouse=True)
def no_jvm_left():
    """Stop Spark after the module and check that its JVM is gone."""
    _require_pyspark()
    yield
    spark_engine.stop_spark()
    assert not _java_children(), "a JVM started by the Spark tests is still running"


@pytest.fixture
def spark():
    """A SparkSession for hhlink (started once and shared; a link run leaves a caller's session running)."""
    return spark_engine.spark_session(_spark_cfg())


@pytest.fixture(scope="module")
def identifiers(tmp_path_factory):
    """A 1,500-person population through the real generate, ingest and pseudonymise stages."""
    from linkage.ingest.stage import ingest
    from linkage.pseudonymise.stage import pseudonymise
    from synthetic_data import generate_population

    mp = pytest.MonkeyPatch()
    mp.setenv("HHLINK_KEY", KEY)
    mp.delenv("HHLINK_KEY_FILE", raising=False)
    root = tmp_path_factory.mktemp("spark_ids")
    cfg = load_config(generate={"persons": PERSONS, "seed": 11})
    generate_population(cfg.generate, root)
    ingest(cfg, root)
    pseudonymise(cfg, root)
    mp.undo()
    return root


@pytest.fixture(scope="module")
def duckdb_linked(identifiers, tmp_path_factory):
    """The identifiers linked on DuckDB with the project's settings: (workspace, summary)."""
    ws = _copy_identifiers(identifiers, tmp_path_factory.mktemp("duck"))
    return ws, link(load_config(), ws, key=MASTER)


# -- errors a user can act on ----------------------------------------------------------------------

def test_missing_pyspark_is_a_one_line_error_naming_the_extra(identifiers, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark", None)          # import pyspark now raises ImportError
    ws = _copy_identifiers(identifiers, tmp_path)
    with pytest.raises(spark_engine.SparkUnavailableError, match=r"pip install 'hhlink\[spark\]'"):
        link(_spark_cfg(), ws, key=MASTER)
    assert not (ws / "linked").exists()


def test_missing_java_is_a_clear_error(tmp_path, monkeypatch):
    spark_engine.stop_spark()                                   # a running JVM would be reused
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))              # no bin/java there
    with pytest.raises(spark_engine.SparkUnavailableError, match="Java 17"):
        spark_engine.spark_session(_spark_cfg())
    assert not _java_children()


# -- the Dice SQL ----------------------------------------------------------------------------------

def test_spark_dice_sql_equals_duckdb_and_python_on_real_filters(identifiers, spark):
    con = duckdb.connect()
    con.register("ids_in", read_identifiers(identifiers, MASTER))
    con.execute("""
        create table ids as select distinct fn_bf, fn_phon_tok, sn_bf, sn_phon_tok, addr_bf, postcode_tok
        from ids_in;
        create table ranked as select *, row_number() over (order by hash(fn_bf), hash(addr_bf)) as rn from ids;
        -- similar values (same phonetic code or postcode, different filter): high and middling Dice.
        -- Every LIMIT is ordered, so the same filters give the same pairs on every run.
        create table near as
        (select a.fn_bf as l, b.fn_bf as r from ids a join ids b on a.fn_phon_tok = b.fn_phon_tok
         and a.fn_bf < b.fn_bf order by hash(a.fn_bf, b.fn_bf) limit 2000)
        union all (select a.sn_bf, b.sn_bf from ids a join ids b on a.sn_phon_tok = b.sn_phon_tok
                   and a.sn_bf < b.sn_bf order by hash(a.sn_bf, b.sn_bf) limit 2000)
        union all (select a.addr_bf, b.addr_bf from ids a join ids b on a.postcode_tok = b.postcode_tok
                   and a.addr_bf < b.addr_bf order by hash(a.addr_bf, b.addr_bf) limit 2000);
    """)
    con.execute(f"""
        create table pairs as
        -- the closest near-identical pairs (Dice just below 1, where rounding would show) and a spread
        (select l, r from near order by {dice_sql('l', 'r', 'duckdb')} desc, hash(l, r) limit 100)
        union all (select l, r from near order by hash(l, r) limit 900)
        -- unrelated values, identical values, and NULLs
        union all (select a.fn_bf, b.fn_bf from ranked a join ranked b on b.rn = a.rn + 1 order by a.rn limit 300)
        union all (select a.addr_bf, b.addr_bf from ranked a join ranked b on b.rn = a.rn + 7 order by a.rn limit 300)
        union all (select fn_bf, fn_bf from ids where fn_bf is not null order by hash(fn_bf) limit 50)
        union all (select fn_bf, null from ids order by hash(fn_bf) limit 5)
        union all (select null, addr_bf from ids order by hash(addr_bf) limit 5)
    """)
    con.execute(f"create table scored as select l, r, {dice_sql('l', 'r', 'duckdb')} as d from pairs")
    table = con.sql("select l, r, d from scored").to_arrow_table()
    n_pairs = table.num_rows                                  # (never show the filters themselves)
    assert n_pairs > 1000
    lengths = {len(v) for v in table.column("l").to_pylist() if v is not None}
    assert lengths == {64, 128}, "expected 512-bit name filters and 1024-bit address filters"
    spark.createDataFrame(table).createOrReplaceTempView("dice_pairs")
    got = spark.sql(f"select {dice_sql('l', 'r', 'spark')} as s, d from dice_pairs").collect()
    reference = [dice(a, b) for a, b in zip(table.column("l").to_pylist(), table.column("r").to_pylist())]
    assert [row.s is None for row in got] == [v is None for v in reference] == [row.d is None for row in got]
    assert max(abs(row.s - row.d) for row in got if row.s is not None) < 1e-12
    assert max(abs(row.s - v) for row, v in zip(got, reference) if v is not None) < 1e-12
    assert min(row.s for row in got if row.s is not None) < 0.5 < 0.9 < max(
        row.s for row in got if row.s is not None and row.s < 1)


# -- the engines agree -----------------------------------------------------------------------------

@pytest.mark.slow
def test_spark_with_the_duckdb_model_gives_the_same_persons(identifiers, duckdb_linked, spark, tmp_path):
    duck_ws, duck = duckdb_linked
    ws = _copy_identifiers(identifiers, tmp_path / "spark")
    model = tmp_path / "duckdb_model.json"
    shutil.copy(duck_ws / "linked" / "model.json", model)

    summary = link(_spark_cfg(), ws, key=MASTER, model=model)

    assert summary["engine"] == "spark" and summary["model_loaded_from"] == str(model)
    assert summary["records"] == duck["records"] and summary["identities"] == duck["identities"]
    duck_persons, spark_persons = _partition(duck_ws), _partition(ws)
    different = len(duck_persons ^ spark_persons)
    assert different == 0, f"{different} persons differ between DuckDB and Spark"
    assert summary["persons"] == duck["persons"] == len(spark_persons)
    # the scored pairs too: the same pairs, with the same weights
    pairs = duckdb.sql(f"""
        select count(*) filter (where d.unique_id_l is null or s.unique_id_l is null),
               max(abs(d.match_weight - s.match_weight)), count(*)
        from '{duck_ws}/linked/pairs.parquet' d
        full join '{ws}/linked/pairs.parquet' s
             on d.unique_id_l = s.unique_id_l and d.unique_id_r = s.unique_id_r""").fetchall()[0]
    assert pairs[0] == 0 and pairs[1] < 1e-9 and pairs[2] == summary["pairs_scored"] == duck["pairs_scored"]
    # the session was the caller's (the fixture's): the run leaves it running
    from pyspark.sql import SparkSession

    assert SparkSession.getActiveSession() is not None


@pytest.mark.slow
def test_spark_training_matches_duckdb_within_sampling_error(identifiers, duckdb_linked, tmp_path):
    duck_ws, duck = duckdb_linked
    ws = _copy_identifiers(identifiers, tmp_path / "spark")
    spark_engine.stop_spark()                                   # so that the link run starts its own

    summary = link(_spark_cfg(u_max_pairs=SPARK_U_MAX_PAIRS), ws, key=MASTER)

    # the run stopped the session it started, and its JVM
    from pyspark.sql import SparkSession

    assert SparkSession.getActiveSession() is None and not _java_children()
    spark_model = json.loads((ws / "linked" / "model.json").read_text())
    duck_model = json.loads((duck_ws / "linked" / "model.json").read_text())
    assert spark_model["sql_dialect"] == "spark" and duck_model["sql_dialect"] == "duckdb"
    # the prior comes from deterministic rules: the same on both engines
    assert spark_model["probability_two_random_records_match"] == pytest.approx(
        duck_model["probability_two_random_records_match"], rel=1e-9)
    # u: Spark's random sample of n pairs (all pairs among ~sqrt(2n) identities) against
    # DuckDB's 5e6-pair estimate. For a U-statistic over s sampled identities the standard
    # error is at most 2 sqrt(u(1-u)/s); allow four of those, plus three counts.
    n = SPARK_U_MAX_PAIRS
    s = math.sqrt(2 * n)
    checked = 0
    for dc, sc in zip(duck_model["comparisons"], spark_model["comparisons"], strict=True):
        assert dc["output_column_name"] == sc["output_column_name"]
        for dl, sl in zip(dc["comparison_levels"], sc["comparison_levels"], strict=True):
            if dl.get("is_null_level"):
                continue
            where = f"{dc['output_column_name']}: {dl['label_for_charts']}"
            du, su = dl.get("u_probability"), sl.get("u_probability")
            if isinstance(du, float):
                su = su if isinstance(su, float) else 0.0       # a level absent from Spark's sample
                tolerance = 4 * 2 * math.sqrt(du * (1 - du) / s) + 3 / n
                assert abs(su - du) <= tolerance, f"u of {where}: {su:.6f} vs {du:.6f} (tolerance {tolerance:.6f})"
                checked += 1
            dm, sm = dl.get("m_probability"), sl.get("m_probability")
            if isinstance(dm, float) and isinstance(sm, float):
                # EM runs on the same blocked pairs from the same start; only u differs
                assert abs(sm - dm) <= 0.01, f"m of {where}: {sm:.6f} vs {dm:.6f}"
    assert checked >= 25
    # and the persons it finds are nearly DuckDB's (pairwise agreement of record pairs)
    duck_pairs, spark_pairs = _pairs(_partition(duck_ws)), _pairs(_partition(ws))
    f1 = 2 * len(duck_pairs & spark_pairs) / (len(duck_pairs) + len(spark_pairs))
    assert f1 >= 0.99, f"pairwise F1 between the Spark-trained and DuckDB partitions is {f1:.4f}"
    assert summary["records"] == duck["records"]


# -- pyspark installed beside Great Expectations -----------------------------------------------------

def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_runs_with_pyspark_installed(tmp_path):
    proc = _run(["-m", "linkage.cli", "--help"], tmp_path)
    assert proc.returncode == 0 and "Usage:" in proc.stdout, proc.stderr[-2000:]


def test_great_expectations_imports_with_pyspark_installed_from_a_script(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(f"""
        import great_expectations
        import pyspark.sql
        import linkage.cli, linkage.quality, linkage.link.spark
        print({MARKER!r})
    """))
    proc = _run([str(script)], tmp_path)
    assert proc.returncode == 0 and MARKER in proc.stdout, proc.stderr[-2000:]


def test_python_c_that_imports_linkage_then_great_expectations_runs_to_the_end(tmp_path):
    # without linkage's guard pyspark's doctest check ends `python -c` here with status 0 and no output
    proc = _run(["-c", f"import linkage, great_expectations; print({MARKER!r})"], tmp_path)
    assert proc.returncode == 0 and MARKER in proc.stdout, proc.stderr[-2000:]
