"""The Spark engine for linkage: a SparkSession set up for Splink's ``SparkAPI``, and its shutdown.

``link.engine = "spark"`` runs the same Splink model as DuckDB through Splink's own
``SparkAPI`` (no second abstraction over it). Spark is an optional extra
(``pip install 'hhlink[spark]'``) and needs Java (17 or later for Spark 4).

The session runs on ``link.spark_master``: ``local[2]`` on this machine, or a cluster's
master URL. Splink's similarity UDF jar is put on ``spark.jars`` and Splink writes its
intermediate tables as Parquet under a checkpoint folder in the run's temporary folder
(``linked/.tmp``); on a cluster the workspace must be on storage that every executor
can read.

A session this module starts for a link run is stopped, with its JVM, when the run ends
(:func:`release_spark`). A session that already exists (started by the caller, a
notebook or Databricks) is reused and left running.

Example:
    >>> from linkage.config import load_config
    >>> db_api = spark_db_api(load_config(link={"engine": "spark"}), tmp)   # doctest: +SKIP
    >>> release_spark()                                                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from linkage.config import Config
from linkage.errors import HhlinkError

__all__ = ["SparkUnavailableError", "spark_session", "spark_db_api", "release_spark", "stop_spark"]

log = logging.getLogger(__name__)

INSTALL_HINT = "install the spark extra: pip install 'hhlink[spark]'"
SHUFFLE_PARTITIONS = 8
_started_here = None        # the session spark_db_api started, which release_spark stops


class SparkUnavailableError(HhlinkError):
    """The Spark engine cannot start: pyspark is not installed, Java is missing, or the JVM failed."""


def _require_pyspark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise SparkUnavailableError(f"engine 'spark' needs pyspark, which is not installed: {INSTALL_HINT}") from None


def _require_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    java = Path(java_home) / "bin" / "java" if java_home else shutil.which("java")
    if java is None or not Path(java).is_file():
        where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "no 'java' on PATH"
        raise SparkUnavailableError(f"engine 'spark' needs Java 17 or later ({where}); install a JDK "
                                    "or set JAVA_HOME")


def spark_session(config: Config):
    """Return the active SparkSession, or start one configured for Splink on ``link.spark_master``.

    A new session gets Splink's similarity jar, ``spark.sql.shuffle.partitions=8`` and no
    UI; on a ``local`` master it binds to 127.0.0.1 (``SPARK_LOCAL_IP``, unless set).

    Args:
        config: the hhlink configuration (``config.link.spark_master``).

    Returns:
        A ``pyspark.sql.SparkSession``.

    Raises:
        SparkUnavailableError: pyspark is not installed, Java is missing, or the JVM did not start.

    Example:
        >>> spark = spark_session(load_config())     # doctest: +SKIP
    """
    _require_pyspark()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    _require_java()
    from splink.backends.spark import similarity_jar_location

    master = config.link.spark_master
    if master.startswith("local"):
        # a cluster's executors must reach the driver, so only a local master is pinned to loopback
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = (SparkSession.builder.appName("hhlink-link").master(master)
               .config("spark.jars", similarity_jar_location())
               .config("spark.sql.shuffle.partitions", str(SHUFFLE_PARTITIONS))
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false"))
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - pyspark raises its own runtime errors for a JVM that exits
        raise SparkUnavailableError(f"Spark could not start on master '{master}' ({exc.__class__.__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}); check that Java 17 "
                                    "or later is installed") from None
    spark.sparkContext.setLogLevel("ERROR")
    log.info("started Spark %s on %s", spark.version, master)
    return spark


def spark_db_api(config: Config, tmp_dir: Path | str):
    """Splink's ``SparkAPI`` on a session for this run, checkpointing under ``tmp_dir``.

    Reuses an active session (the caller's, left running); otherwise starts one, which
    :func:`release_spark` stops when the run ends.

    Args:
        config: the hhlink configuration (``config.link.spark_master``).
        tmp_dir: the run's temporary folder; Splink's Parquet checkpoints go in
            ``tmp_dir/spark-checkpoints``.

    Returns:
        A :class:`splink.backends.spark.SparkAPI`.

    Raises:
        SparkUnavailableError: pyspark is not installed, Java is missing, or the JVM did not start.

    Example:
        >>> db_api = spark_db_api(load_config(link={"engine": "spark"}), Path("linked/.tmp"))  # doctest: +SKIP
    """
    global _started_here
    _require_pyspark()
    from pyspark import SparkContext

    existed = SparkContext._active_spark_context is not None
    spark = spark_session(config)
    if not existed:
        _started_here = spark
    checkpoints = Path(tmp_dir) / "spark-checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    spark.sparkContext.setCheckpointDir(str(checkpoints))
    from splink.backends.spark import SparkAPI

    return SparkAPI(spark_session=spark)


def release_spark() -> None:
    """Stop the session :func:`spark_db_api` started, and its JVM; leave a caller's session running."""
    global _started_here
    if _started_here is not None:
        _started_here = None
        stop_spark()


def stop_spark() -> None:
    """Stop the active SparkSession and shut down the JVM behind it (no-op without pyspark or a session).

    ``SparkSession.stop()`` alone leaves the py4j gateway JVM running until Python exits;
    this ends it too, so a later session starts a fresh JVM.
    """
    try:
        from pyspark import SparkContext
        from pyspark.sql import SparkSession
    except ImportError:
        return
    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()
    gateway = SparkContext._gateway
    if gateway is None:
        return
    proc = getattr(gateway, "proc", None)
    try:
        gateway.shutdown()
    except Exception:  # noqa: BLE001 - the JVM may already be gone
        pass
    if proc is not None:
        if proc.stdin is not None:
            proc.stdin.close()      # the gateway exits when its stdin closes
        try:
            proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            proc.kill()
            proc.wait(timeout=10)
    SparkContext._gateway = None
    SparkContext._jvm = None
    log.info("stopped Spark and its JVM")
