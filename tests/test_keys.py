"""The master key: where it comes from, file permissions, HKDF subkeys, fingerprints, the CLI."""

from __future__ import annotations

import base64
import hashlib
import os
import pickle
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linkage.keys import (ENV_KEY, ENV_KEY_FILE, KeyFormatError, KeyNotFoundError, KeyPermissionError, MasterKey,
                          SecretKeyError, default_key_path, derive_key, fingerprint, init_key_file,
                          load_master_key, project_key)

SECRET = hashlib.sha256(b"hhlink keys test").digest()       # a fixed test key, generated here


@pytest.fixture
def no_key_env(monkeypatch, tmp_path):
    """No key in the environment, and a default key path inside this test's folder."""
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


def _write_key(path, text: str, mode: int = 0o600):
    path.write_text(text)
    os.chmod(path, mode)
    return path


# -- derivation ------------------------------------------------------------------------------

def test_subkeys_are_hkdf_sha256_per_purpose():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    oracle = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"hhlink/key-derivation/v1",
                  info=b"hhlink:tokens").derive(SECRET)
    assert derive_key(SECRET, "tokens") == oracle
    purposes = ["tokens", "bloom:first_name", "bloom:surname", "bloom:address", "crosswalk", "project:p1",
                "fingerprint"]
    derived = {derive_key(SECRET, p) for p in purposes}
    assert len(derived) == len(purposes) and SECRET not in derived


def test_project_keys_differ_per_project_and_from_other_purposes():
    assert project_key(SECRET, "p1") == derive_key(SECRET, "project:p1")
    assert project_key(SECRET, "p1") != project_key(SECRET, "p2")
    assert project_key(MasterKey(SECRET, "test"), "p1") == project_key(SECRET, "p1")
    with pytest.raises(ValueError):
        project_key(SECRET, " ")


@settings(max_examples=50, deadline=None)
@given(master=st.binary(min_size=32, max_size=64), other=st.binary(min_size=32, max_size=64),
       purpose=st.text(min_size=1, max_size=20))
def test_derivation_is_deterministic_per_key_and_differs_across_keys(master, other, purpose):
    assert derive_key(master, purpose) == derive_key(master, purpose)
    assert len(derive_key(master, purpose, 16)) == 16
    if other != master:
        assert derive_key(other, purpose) != derive_key(master, purpose)
        assert fingerprint(other) != fingerprint(master)


def test_short_keys_are_refused():
    with pytest.raises(KeyFormatError, match="at least 32"):
        derive_key(b"x" * 31, "tokens")
    with pytest.raises(KeyFormatError):
        MasterKey(b"x" * 16, "test")


def test_fingerprint_names_the_key_without_revealing_it():
    key = MasterKey(SECRET, "test")
    assert len(key.fingerprint) == 16 and int(key.fingerprint, 16) >= 0
    assert key.fingerprint not in SECRET.hex()
    assert key.fingerprint == fingerprint(SECRET) == derive_key(SECRET, "fingerprint", 8).hex()
    for text in (repr(key), str(key), f"{key}"):
        assert SECRET.hex() not in text and key.fingerprint in text
    with pytest.raises(TypeError):
        pickle.dumps(key)


# -- loading ---------------------------------------------------------------------------------

def test_key_from_environment_hex_or_base64(no_key_env, monkeypatch):
    monkeypatch.setenv(ENV_KEY, SECRET.hex())
    assert load_master_key().secret == SECRET
    monkeypatch.setenv(ENV_KEY, base64.b64encode(SECRET).decode())
    assert load_master_key().secret == SECRET
    monkeypatch.setenv(ENV_KEY, base64.urlsafe_b64encode(SECRET + b"\xff" * 4).decode())
    assert load_master_key().secret == SECRET + b"\xff" * 4


@pytest.mark.parametrize("bad, message", [("abcd", "at least 32"), ("not a key!", "neither hex nor base64"),
                                          ("ab" * 31, "at least 32")])
def test_bad_environment_keys_are_clear_errors_without_the_value(no_key_env, monkeypatch, bad, message):
    monkeypatch.setenv(ENV_KEY, bad)
    with pytest.raises(KeyFormatError, match=message) as err:
        load_master_key()
    assert bad not in str(err.value)


def test_no_key_anywhere_is_a_clear_error(no_key_env):
    with pytest.raises(KeyNotFoundError, match="HHLINK_KEY.*hhlink keys init"):
        load_master_key()


def test_precedence_explicit_file_then_env_then_env_file_then_default(no_key_env, monkeypatch):
    other = hashlib.sha256(b"other").digest()
    third = hashlib.sha256(b"third").digest()
    default = default_key_path()
    default.parent.mkdir(parents=True)
    _write_key(default, hashlib.sha256(b"default").hexdigest())
    assert load_master_key().path == default
    env_file = _write_key(no_key_env / "env.key", third.hex())
    monkeypatch.setenv(ENV_KEY_FILE, str(env_file))
    assert load_master_key().secret == third
    monkeypatch.setenv(ENV_KEY, other.hex())
    assert load_master_key().secret == other
    explicit = _write_key(no_key_env / "explicit.key", SECRET.hex() + "\n")
    assert load_master_key(explicit).secret == SECRET


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660, 0o644, 0o601])
def test_key_files_open_to_group_or_others_are_refused(no_key_env, mode):
    path = _write_key(no_key_env / "m.key", SECRET.hex(), mode)
    with pytest.raises(KeyPermissionError, match=f"{mode:04o}.*chmod 600"):
        load_master_key(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_key_files_are_accepted(no_key_env, mode):
    path = _write_key(no_key_env / "m.key", SECRET.hex(), mode)
    assert load_master_key(path).secret == SECRET


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_key_files_in_folders_others_can_write_are_refused(no_key_env, mode):
    folder = no_key_env / "shared"
    folder.mkdir()
    os.chmod(folder, mode)
    path = _write_key(folder / "m.key", SECRET.hex())
    with pytest.raises(KeyPermissionError, match="folder others can write"):
        load_master_key(path)
    os.chmod(folder, 0o755)   # not writable by group or others: accepted
    assert load_master_key(path).secret == SECRET


def test_missing_or_odd_key_files_are_refused(no_key_env):
    with pytest.raises(KeyNotFoundError, match="hhlink keys init"):
        load_master_key(no_key_env / "missing.key")
    folder = no_key_env / "dir.key"
    folder.mkdir(mode=0o700)
    with pytest.raises(KeyPermissionError, match="not a regular file"):
        load_master_key(folder)
    binary = no_key_env / "bin.key"
    binary.write_bytes(b"\xff\xfe" * 20)
    os.chmod(binary, 0o600)
    with pytest.raises(KeyFormatError):
        load_master_key(binary)


def test_key_file_inside_the_workspace_is_refused(no_key_env):
    ws = no_key_env / "ws"
    ws.mkdir()
    path = _write_key(ws / "master.key", SECRET.hex())
    with pytest.raises(KeyPermissionError, match="inside the workspace"):
        load_master_key(path, workspace=ws)
    assert load_master_key(path).secret == SECRET       # the same file is fine when no workspace is in play


# -- creating --------------------------------------------------------------------------------

def test_init_creates_a_0600_key_and_never_overwrites(no_key_env):
    path = no_key_env / "new" / "sub" / "master.key"
    key = init_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert len(text.strip()) == 64 and bytes.fromhex(text.strip()) == key.secret
    assert load_master_key(path).fingerprint == key.fingerprint
    with pytest.raises(SecretKeyError, match="already exists"):
        init_key_file(path)
    assert path.read_text() == text
    assert init_key_file(no_key_env / "second.key").secret != key.secret


def test_init_defaults_to_the_config_folder(no_key_env):
    key = init_key_file()
    assert key.path == default_key_path() == no_key_env / "config" / "hhlink" / "master.key"


# -- the CLI ---------------------------------------------------------------------------------

def test_cli_keys_init_and_fingerprint(run_cli, no_key_env):
    path = no_key_env / "cli.key"
    code, out, err = run_cli("keys", "init", "--key-file", str(path))
    assert code == 0, err
    fp = load_master_key(path).fingerprint
    assert fp in out and load_master_key(path).secret.hex() not in out + err
    code, out, err = run_cli("keys", "fingerprint", "--key-file", str(path))
    assert code == 0 and out.startswith(fp)
    code, out, err = run_cli("keys", "init", "--key-file", str(path))
    assert code != 0 and "already exists" in err and len(err.strip().splitlines()) == 1
    os.chmod(path, 0o644)
    code, out, err = run_cli("keys", "fingerprint", "--key-file", str(path))
    assert code != 0 and "chmod 600" in err and "Traceback" not in err


def test_cli_refuses_a_key_file_inside_the_workspace(run_cli, no_key_env):
    ws = no_key_env / "ws"
    ws.mkdir()
    code, _, err = run_cli("keys", "init", "--key-file", str(ws / "k.key"), "--workspace", str(ws))
    assert code != 0 and "inside the workspace" in err
    assert not (ws / "k.key").exists()
