"""``hhlink link-files``: pseudonymise and link a data engineer's own extracts."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import CONFIG_HELP, KEY_FILE_HELP, cli


@cli.command("link-files")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--map", "map_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="TOML map: one [files.<file stem>] table per file, naming the column of each role.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for clusters.csv, pairs.csv, model.json and report.html/.json.")
@click.option("--threshold", type=float, default=None,
              help="Match probability at or above which records share a cluster (default: link.threshold).")
@click.option("--link-only/--no-link-only", default=None,
              help="Link across files only, never within one (default: the map's link_only, else false).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help=KEY_FILE_HELP)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=CONFIG_HELP)
def link_files_command(files: tuple[Path, ...], map_path: Path, out: Path, threshold: float | None,
                       link_only: bool | None, key_file: Path | None, config_path: Path | None) -> None:
    """Link FILE ... (CSV or Parquet): dedupe within each file and link across them.

    The map names each file's table by its stem and, in it, the column(s) playing each
    role: record_id, first_name, surname, dob = { column, format, invalid }, sex, postcode, address
    (a column or a list joined with spaces) and id (one identifier, e.g. an NHS number,
    meaning the same in every file). Any role may be absent. The values are encoded with
    hhlink's keyed tokens and Bloom filters and linked with its Splink model. OUT gets
    clusters.csv (file, record_id, cluster_id: every input row once), pairs.csv (both
    record ids and files, match_probability, match_weight) and the linkage-quality report;
    no cleartext identifier except the record ids. Rows in error messages count from 1
    after the header. A CSV is read with the dialect the map states (delimiter, quote,
    encoding, header, trim; default comma, '"', utf-8, line 1, trimmed), never sniffed.

    \b
    Example:
      hhlink link-files patients_2024.csv clinic.csv --map map.toml --out linked/
    """
    from linkage.config import load_config
    from linkage.link_files.stage import link_files

    s = link_files(files, map_path, out, config=load_config(config_path), key_file=key_file, threshold=threshold,
                   link_only=link_only)
    click.echo(f"linked {s['records']:,} records from {len(s['files'])} file(s) into {s['clusters']:,} clusters "
               f"({s['pairs_at_threshold']:,} pairs at or above {s['threshold']}) in {s['seconds']:.1f}s")
    training = s.get("training", {})
    if training.get("m"):
        click.echo(f"  training: u by {training['u']['how']}; m by {training['m']['how']}")
    for table, info in s["files"].items():
        for column, n in info.get("invalid_as_missing", {}).items():
            click.echo(f"  {table}: {n:,} value(s) of {column} off the map's format, used as missing "
                       f"(invalid = \"error\" stops instead)")
    if s.get("files_not_compared"):
        click.echo(f"  not compared (no blocking rule fits their common roles): {', '.join(s['files_not_compared'])}")
    for name in ("clusters.csv", "pairs.csv", "report.html"):
        click.echo(f"  {out / name}")
