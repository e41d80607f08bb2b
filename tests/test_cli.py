"""The hhlink command line: help with examples, and one-line errors for bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import linkage.cli  # noqa: F401  (registers the commands)
from linkage.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands():
    return sorted(cli.commands)


# commands that work on files the user names, not on a workspace
NO_WORKSPACE = {"link-files"}


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help_with_workspace_and_an_example(run_cli, command):
    code, out, err = run_cli(command, "--help")
    assert code == 0, err
    assert ("--workspace" in out) != (command in NO_WORKSPACE)
    assert "Example:" in out
    assert f"hhlink {command}" in out


@pytest.mark.parametrize("command", _commands())
def test_every_command_is_in_the_readme(command):
    assert re.search(rf"hhlink {command}\b", README), f"hhlink {command} is missing from README.md"


def test_generate_writes_landing_and_truth(run_cli, tmp_path):
    code, out, err = run_cli("generate", "--persons", "600", "--seed", "3", "--workspace", str(tmp_path / "ws"))
    assert code == 0, err
    assert "education.csv" in out
    assert sorted(p.name for p in (tmp_path / "ws" / "landing").iterdir()) == [
        "benefits.csv", "earnings.csv", "education.csv"]
    assert (tmp_path / "ws" / "truth" / "planted.json").exists()


def _one_line_error(code: int, out: str, err: str) -> str:
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_negative_size_is_a_one_line_error(run_cli, tmp_path):
    msg = _one_line_error(*run_cli("generate", "--persons", "-5", "--workspace", str(tmp_path)))
    assert "persons" in msg


def test_non_numeric_size_is_a_one_line_error(run_cli, tmp_path):
    msg = _one_line_error(*run_cli("generate", "--persons", "lots", "--workspace", str(tmp_path)))
    assert "persons" in msg


def test_unknown_config_key_is_a_one_line_error(run_cli, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[generate]\npersons = 100\npersns = 5\n")
    msg = _one_line_error(*run_cli("generate", "--config", str(cfg), "--workspace", str(tmp_path / "ws")))
    assert "unknown key 'generate.persns'" in msg and str(cfg) in msg


def test_bad_config_value_and_bad_toml_are_one_line_errors(run_cli, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[generate]\nige = 'high'\n")
    assert "generate.ige" in _one_line_error(*run_cli("config", "--config", str(cfg)))
    cfg.write_text("[generate\n")
    assert "not valid TOML" in _one_line_error(*run_cli("config", "--config", str(cfg)))
    assert "not found" in _one_line_error(*run_cli("config", "--config", str(tmp_path / "missing.toml")))


def test_unwritable_workspace_is_a_one_line_error(run_cli):
    # /proc refuses new folders even to root, who can write anywhere else
    msg = _one_line_error(*run_cli("generate", "--persons", "100", "--workspace", "/proc/hhlink-ws"))
    assert "workspace" in msg and "/proc/hhlink-ws" in msg


def test_workspace_that_cannot_be_created_is_a_one_line_error(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    msg = _one_line_error(*run_cli("generate", "--persons", "100", "--workspace", str(blocker / "ws")))
    assert "workspace" in msg and str(blocker) in msg


def test_unknown_option_is_a_one_line_error(run_cli, tmp_path):
    _one_line_error(*run_cli("generate", "--peeple", "5"))
