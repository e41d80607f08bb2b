"""``hhlink run``: every stage as the Prefect flow ``household-linkage``, with a progress display."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from linkage.cli.base import KEY_FILE_HELP, cli, common_options, is_verbose
from linkage.config import load_config
from linkage.errors import HhlinkError

REPORTS = (
    ("data quality", "reports/quality/data_docs/index.html"),
    ("linkage quality", "reports/linkage/report.html"),
    ("disclosure decisions", "reports/disclosure/report.html"),
    ("evaluation", "reports/evaluation.json"),
    ("mobility", "reports/mobility.json"),
)


def prefect_environment(verbose: bool) -> None:
    """Settings for a CLI-driven Prefect run; must run before ``prefect`` is imported. Explicit settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # a fresh temporary server runs its migrations first: ~20 s on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # the progress display says what runs; every log line still goes to the Prefect server
    level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", level)
    for handler in logging.getLogger().handlers:   # hhlink's own console handler (logging.basicConfig)
        handler.setLevel(level)
        if not verbose:
            # a failed run ends in one line from the CLI; Prefect's own tracebacks stay on the server
            handler.addFilter(lambda record: not record.name.startswith("prefect"))


def check_prefect_server() -> None:
    """With ``PREFECT_API_URL`` set, stop with one line if that server does not answer (else a temporary one runs)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    if not url:
        return
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5).raise_for_status()
    except (httpx.HTTPError, ValueError) as exc:
        raise HhlinkError(f"the Prefect server at PREFECT_API_URL={url} does not answer ({exc.__class__.__name__}): "
                          "start it ('prefect server start --host 127.0.0.1'), or unset PREFECT_API_URL to run on a "
                          "temporary local server") from None


class _Display:
    """A rich progress line per stage: spinner, status, elapsed time, latest library message."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(finished_text="[green]•"), TextColumn("[bold]{task.fields[stage]:<13}"),
                                 TextColumn("{task.fields[status]:<8}"), TimeElapsedColumn(),
                                 TextColumn("[dim]{task.fields[detail]}"), console=Console(stderr=True))
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, status: str, detail: str) -> None:
        detail = " ".join(detail.split())[:80]
        if status == "running":
            self.tasks[stage] = self.progress.add_task(stage, total=1, stage=stage, status="running", detail="")
            return
        task = self.tasks.get(stage)
        if task is None:
            return
        if status == "log":
            self.progress.update(task, detail=detail)
        else:
            shown = {"cached": "skipped", "failed": "[red]FAILED"}.get(status, status)
            note = {"cached": "inputs unchanged since it last ran", "failed": detail}.get(status, "")
            self.progress.update(task, status=shown, detail=note, completed=1)
            self.progress.stop_task(task)


@cli.command("run")
@common_options
@click.option("--persons", type=int, default=None,
              help="Generate a synthetic population of N persons into DIR/landing/ first.")
@click.option("--seed", type=int, default=None, help="Seed of the generated population (default from config).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help=KEY_FILE_HELP)
@click.option("--refresh", is_flag=True, help="Run every stage even when its inputs are unchanged.")
def run_command(workspace: Path, config_path: Path | None, persons: int | None, seed: int | None,
                key_file: Path | None, refresh: bool) -> None:
    """Run every stage on DIR as the Prefect flow 'household-linkage'.

    ingest -> pseudonymise -> link -> assemble -> evaluate (when DIR/truth/ exists) ->
    disclose, on the extracts in DIR/landing/; with --persons or --seed a synthetic
    population is generated first. A stage whose inputs, settings and code are unchanged
    since it last ran is skipped, so a run that was interrupted (even killed) picks up where
    it stopped. A quality gate (a critical expectation, or linkage below the [flow]
    minimums in hhlink.toml) stops the run before disclose: DIR/published/ keeps the last
    release and the run fails with the reason. Runs go to the Prefect server in
    PREFECT_API_URL, or to a temporary local one.

    \b
    Example:
      hhlink run --workspace ./workspace
      hhlink run --workspace ./workspace --persons 20000 --seed 42
    """
    prefect_environment(is_verbose())
    check_prefect_server()
    cfg = load_config(config_path, generate={"persons": persons, "seed": seed})
    from linkage.keys import load_master_key

    load_master_key(key_file, workspace=workspace)   # no key: stop now, with the key's own message

    from flows import household_linkage_flow
    from flows.progress import listening

    display = _Display()
    with display.progress, listening(display):
        state = household_linkage_flow(str(workspace), cfg, generate=persons is not None or seed is not None,
                                       key_file=str(key_file) if key_file else None, refresh=refresh,
                                       return_state=True)
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, HhlinkError):
            raise exc
        raise HhlinkError(f"the run failed: {state.message}")
    result = state.result()
    root = Path(result["workspace"])
    # the README's path (hhlink deliver, then hhlink run) makes a release too, recorded as the
    # monthly flow records its own; a run with no new landing file records nothing
    from linkage.releases import record_release

    release = record_release(root, run=str(state.state_details.flow_run_id))
    ran = [s for s, v in result["stages"].items() if v["status"] == "ran"]
    cached = [s for s, v in result["stages"].items() if v["status"] == "cached"]
    total = sum(v["seconds"] for v in result["stages"].values())
    click.echo(f"household-linkage finished in {total:.0f}s: ran {', '.join(ran) or 'nothing'}"
               + (f"; skipped (unchanged) {', '.join(cached)}" if cached else ""))
    click.echo(f"  {'published tables':<21} {root / 'published'}/")
    click.echo(f"  {'research tables':<21} {root / 'research'}/")
    if release is not None:
        click.echo(f"  {'release':<21} {release['release']} recorded in {root / 'releases.jsonl'} "
                   f"({len(release['files'])} landing file(s))")
    for title, rel in REPORTS:
        if (root / rel).exists():
            click.echo(f"  {title:<21} {root / rel}")
