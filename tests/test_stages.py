"""The stage registry, lineage and key checks, the workspace lock for every stage command, CLI errors."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from linkage.config import load_config
from linkage.stages import STAGES, producer, run_stage

KEY_A = "a1" * 32
KEY_B = "b2" * 32
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, key: str | None = KEY_A, env: dict | None = None, cwd: Path | None = None):
    return _cli_together([args], key=key, env=env, cwd=cwd)[0]


def _cli_together(calls: list[tuple[str, ...]], key: str | None = KEY_A, env: dict | None = None,
                  cwd: Path | None = None) -> list[tuple[int, str, str]]:
    """Run independent ``hhlink`` commands at the same time (one per core); (code, stdout, stderr) of each."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("HHLINK_")}
    if key:
        e["HHLINK_KEY"] = key
    e.update(env or {})
    procs = [subprocess.Popen([sys.executable, "-m", "linkage.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=e, cwd=cwd) for args in calls]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            done.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def _key_file(folder: Path, hexkey: str) -> Path:
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / "k.key"
    path.write_text(hexkey + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def linked_ws(tmp_path_factory) -> Path:
    """A 300-person workspace through link, built with the CLI (so lineage is recorded)."""
    ws = tmp_path_factory.mktemp("lineage") / "ws"
    for args in (("generate", "--persons", "300", "--seed", "3"), ("ingest",), ("pseudonymise",), ("link",)):
        code, out, err = _cli(*args, "--workspace", str(ws))
        assert code == 0, err
    return ws


def test_every_stage_is_declared_once_with_one_signature():
    assert list(STAGES) == ["generate", "ingest", "pseudonymise", "link", "assemble", "evaluate", "disclose"]
    for stage in STAGES.values():
        params = list(inspect.signature(stage.function()).parameters.values())
        assert [p.name for p in params[:2]] == ["config", "workspace"], stage.name
        assert params[2].name == "key" and params[2].default is None, stage.name
        assert stage.writes and all(producer(w) is stage for w in stage.writes)
    # every input of a later stage is written by an earlier one (or is an external delivery)
    order = list(STAGES)
    for stage in STAGES.values():
        for entry in stage.reads:
            up = producer(entry)
            assert up is not None and order.index(up.name) < order.index(stage.name), (stage.name, entry)


def test_flows_and_help_follow_the_registry():
    from flows.stages import STAGE_FLOWS

    assert list(STAGE_FLOWS) == list(STAGES)
    assert all(f.name == name for name, f in STAGE_FLOWS.items())
    code, out, _ = _cli("--help", key=None)
    assert code == 0
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.startswith("  ")]
    assert listed[:len(STAGES)] == list(STAGES)


def test_out_of_order_stages_stop_at_assemble_naming_the_stale_zone(linked_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(linked_ws, ws)
    # pseudonymise again in full (an incremental run with nothing new would carry every token,
    # and linked/ would still be current): new random record tokens
    full = tmp_path / "full.toml"
    full.write_text("[pseudonymise]\nincremental = false\n")
    code, out, err = _cli("pseudonymise", "--workspace", str(ws), "--config", str(full))
    assert code == 0, err
    assert "full: pseudonymise.incremental is false" in out
    code, out, err = _cli("assemble", "--workspace", str(ws))
    assert code == 2 and not (ws / "research").exists()
    assert err.strip().splitlines() == ["error: linked/ is stale: it was built from an older pseudonymised/identifiers/; "
                                        "rebuild it with 'hhlink link' (then the stages after it)"]
    # the library function called directly (no registry) still refuses an empty join
    from linkage.assemble.stage import AssembleError, assemble
    from linkage.keys import MasterKey

    with pytest.raises(AssembleError, match="none of the .* linked records is in pseudonymised/payload/"):
        assemble(load_config(assemble={"data_docs": False}), ws, key=MasterKey(bytes.fromhex(KEY_A), origin="test"))
    code, _, err = _cli("link", "--workspace", str(ws))
    assert code == 0, err
    code, out, err = _cli("assemble", "--workspace", str(ws))
    assert code == 0 and (ws / "research" / "cohort.parquet").exists(), err


def test_an_edited_zone_is_refused_until_rebuilt(linked_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(linked_ws, ws)
    (ws / "linked" / "summary.json").write_text("{}")
    code, _, err = _cli("assemble", "--workspace", str(ws))
    assert code == 2 and "linked/ has changed since 'hhlink link' wrote it" in err


def test_keyed_stages_refuse_another_key_and_rotation_is_explicit(linked_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(linked_ws, ws)
    other = _key_file(tmp_path / "keys", KEY_B)
    for stage in ("pseudonymise", "assemble"):
        code, _, err = _cli(stage, "--workspace", str(ws), "--key-file", str(other))
        assert code == 2, (stage, err)
        assert "is not the one" in err and "hhlink keys rotate" in err and len(err.strip().splitlines()) == 1
    assert not (ws / "research").exists()
    code, out, err = _cli("keys", "rotate", "--workspace", str(ws), "--new-key-file", str(other))
    assert code == 0, err
    history = json.loads((ws / ".flow" / "key-history.json").read_text())
    assert [h["to"] for h in history] == [out.split("under key ")[1].split()[0]]
    # linked/ came from the old pseudonymised/: refused under either key until link runs again
    code, _, err = _cli("assemble", "--workspace", str(ws), "--key-file", str(other))
    assert code == 2 and "linked/ is stale" in err
    # link is keyed (it decrypts the identifiers): the old key is refused, the new one links
    code, _, err = _cli("link", "--workspace", str(ws))       # the old key (HHLINK_KEY)
    assert code == 2 and "is not the one" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli("link", "--workspace", str(ws), "--key-file", str(other))
    assert code == 0, err
    code, _, err = _cli("assemble", "--workspace", str(ws))   # the old key (HHLINK_KEY)
    assert code == 2 and "is not the one linked/ was written under" in err
    code, _, err = _cli("assemble", "--workspace", str(ws), "--key-file", str(other))
    assert code == 0, err
    code, _, err = _cli("disclose", "--workspace", str(ws))   # old key: would perturb with other noise
    assert code == 2 and "is not the one research/ was written under" in err


def test_every_stage_command_takes_the_workspace_lock(linked_ws, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(linked_ws, ws)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom linkage.workspace import hold\n"
                               "with hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n", str(ws)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        stages = ("ingest", "link", "assemble", "disclose")
        for stage, (code, _, err) in zip(stages, _cli_together([(s, "--workspace", str(ws)) for s in stages])):
            assert code == 2 and "another hhlink command is using this workspace" in err, stage
    finally:
        holder.kill()
        holder.wait()


def test_cli_errors_name_what_is_wrong(tmp_path):
    code, _, err = _cli("link", "--threshold", "1.5", "--workspace", str(tmp_path / "ws"))
    assert code == 2 and "'--threshold'" in err and "hhlink.toml" not in err
    code, _, err = _cli("generate", "--persons", "0", "--workspace", str(tmp_path / "ws"))
    assert code == 2 and "'--persons'" in err
    code, out, err = _cli("audit", "verify", "--workspace", str(tmp_path / "typo"))
    assert code == 2 and "no audit log" in err and "ok" not in out
    code, _, err = _cli("run", "--workspace", str(tmp_path / "ws"), "--persons", "100",
                        env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert code == 2 and err.count("\n") == 1 and "PREFECT_API_URL=http://127.0.0.1:9/api" in err


def _foreign(err: str) -> list[str]:
    """stderr lines that are not hhlink's own log lines (library warnings, banners)."""
    return [line for line in err.splitlines() if line.strip() and " linkage." not in line]


def test_verbose_works_after_the_subcommand_and_the_console_stays_quiet(linked_ws, tmp_path):
    ws, ws_v = tmp_path / "ws", tmp_path / "ws-v"
    shutil.copytree(linked_ws, ws)
    shutil.copytree(linked_ws, ws_v)
    (code, out, err), (code_v, out_v, err_v) = _cli_together([("link", "--workspace", str(ws)),
                                                              ("link", "--workspace", str(ws_v), "-v")])
    assert code == 0 and _foreign(err) == [] and "WARNING" not in out
    assert code_v == 0 and " INFO " in err_v and " splink." in err_v   # -v after the subcommand shows library logs
    code, out, err = _cli("assemble", "--workspace", str(ws))
    assert code == 0 and _foreign(err) == []
    code, out, err = _cli("disclose", "--workspace", str(ws))
    assert code == 0 and "HiGHS" not in out + err and _foreign(err) == []


def test_files_hhlink_writes_are_private_to_the_engineer_and_group(linked_ws):
    files = [p for zone in ("landing", "truth", "staged", "pseudonymised", "linked", "reports", ".flow")
             for p in (linked_ws / zone).rglob("*")]
    assert len(files) > 20
    loose = sorted(f"{p.relative_to(linked_ws)} {p.stat().st_mode & 0o777:04o}" for p in files
                   if p.stat().st_mode & 0o027)
    assert loose == []


def test_run_stage_records_lineage_with_the_key_fingerprint(linked_ws):
    from linkage.lineage import read_record

    pseudo, link = read_record(linked_ws, "pseudonymise"), read_record(linked_ws, "link")
    assert pseudo["key"] and link["key"] == pseudo["key"]   # link is not keyed: it inherits its inputs' key
    assert set(link["inputs"]) == {"pseudonymised/identifiers"} and set(link["outputs"]) == {"linked"}
    assert read_record(linked_ws, "generate")["key"] is None
    with pytest.raises(KeyError):
        run_stage("nonsense", load_config(), linked_ws)


def test_lineage_keeps_the_hash_of_a_file_carried_by_hard_link_and_rehashes_a_rewritten_one(tmp_path):
    """A release carries zone files into its new folder by hard link (their ctime changes, no byte
    does): lineage must not hash them again; a file written anew (a new inode) is hashed again."""
    import os

    from linkage.lineage import _DigestCache

    f = tmp_path / "part.parquet"
    f.write_bytes(b"x" * 64)
    first = _DigestCache(tmp_path)
    digest = first.digest(f, "part")
    first.save()
    os.link(f, tmp_path / "carried.parquet")
    again = _DigestCache(tmp_path)
    assert again.digest(f, "part") == digest and not again.changed
    st = f.stat()
    new = tmp_path / "new.tmp"
    new.write_bytes(b"y" * 64)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))   # same size and mtime, another inode
    os.replace(new, f)
    rewritten = _DigestCache(tmp_path)
    assert rewritten.digest(f, "part") != digest and rewritten.changed
