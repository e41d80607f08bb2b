"""The one publish helper: files and folders swapped into place, and a kill mid-swap recovered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from linkage.workspace import Workspace, atomic_path, publish

ROOT = Path(__file__).resolve().parents[1]


def _folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_publish_swaps_a_folder_and_leaves_nothing_beside_it(tmp_path):
    final = _folder(tmp_path / "research", old="1", gone="x")
    publish(_folder(tmp_path / ".research.tmp-1", new="2"), final)
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["research"]


def test_publish_replaces_a_file_and_creates_the_parent(tmp_path):
    built = tmp_path / ".report.json.tmp-1"
    built.write_text("new")
    publish(built, tmp_path / "reports" / "x" / "report.json")
    assert (tmp_path / "reports" / "x" / "report.json").read_text() == "new"
    built = tmp_path / ".report.json.tmp-2"
    built.write_text("newer")
    publish(built, tmp_path / "reports" / "x" / "report.json")
    assert (tmp_path / "reports" / "x" / "report.json").read_text() == "newer"
    assert not built.exists()


def test_publish_moves_a_folder_built_elsewhere_beside_its_target_first(tmp_path):
    built = _folder(tmp_path / "scratch" / "deep" / "built", a="1")
    final = _folder(tmp_path / "reports" / "quality", b="2")
    publish(built, final)
    assert [p.name for p in final.iterdir()] == ["a"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["quality"]


def test_publish_dir_keeps_the_old_zone_when_the_block_fails(tmp_path):
    ws = Workspace(tmp_path / "o'brien ł ws").ensure()
    _folder(ws.zone("linked"), keep="1")
    with pytest.raises(RuntimeError):
        with ws.publish_dir("linked") as out:
            (out / "half").write_text("x")
            raise RuntimeError("stage failed")
    assert [p.name for p in ws.zone("linked").iterdir()] == ["keep"]
    assert sorted(p.name for p in ws.root.iterdir()) == ["linked"]


def test_atomic_path_publishes_only_on_success(tmp_path):
    target = tmp_path / "a.json"
    with pytest.raises(KeyError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyError
    assert not target.exists() and not list(tmp_path.iterdir())
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("zone", ["research", "reports/quality"])
def test_a_kill_between_the_two_renames_is_recovered(tmp_path, zone):
    """A real process killed (os._exit) right after moving the old folder aside: recover() puts it back."""
    ws = Workspace(tmp_path / "a 'b' ł").ensure()
    final = _folder(ws.root / zone, table="previous")
    built = _folder(final.parent / f".{final.name}.tmp-x", table="new")
    code = ("import os, sys\n"
            "from linkage.workspace import publish\n"
            "real = os.rename\n"
            "def rename(a, b):\n"
            "    real(a, b)\n"
            "    os._exit(9)\n"
            "os.rename = rename\n"
            "publish(sys.argv[1], sys.argv[2])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(built), str(final)], cwd=ROOT)
    assert proc.returncode == 9
    assert not final.exists()
    done = ws.recover()
    assert (final / "table").read_text() == "previous"
    assert any("restored" in line for line in done)
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]
