"""The master key and the per-purpose keys derived from it.

One random master secret (at least 32 bytes) protects every pseudonym. It lives
outside the workspace and comes, in this order, from:

1. an explicit key file (``--key-file PATH``);
2. the environment variable ``HHLINK_KEY`` (hex or base64 of >= 32 bytes);
3. the key file named by ``HHLINK_KEY_FILE``;
4. the default key file ``~/.config/hhlink/master.key`` (``$XDG_CONFIG_HOME`` respected).

A key file holds the key as one line of hex; it must be a regular file that neither
group nor others may read or write (mode 0600 or stricter), and ``hhlink keys init``
creates one that way. The master key is never used directly: HKDF-SHA256 derives one
subkey per purpose, so a key leaked or rotated for one use says nothing about another:

=================== ==========================================================
purpose             used for
=================== ==========================================================
``tokens``          keyed HMAC-SHA256 tokens of exact identifiers
``bloom:<field>``   q-gram positions (and the balancing permutation) of a field's Bloom filter
``crosswalk``       AES-256-GCM encryption of the record-token crosswalk
``project:<id>``    per-research-project output keys (:func:`project_key`)
``fingerprint``     the public fingerprint that names the key in metadata
=================== ==========================================================

Only the fingerprint is ever written anywhere. A :class:`MasterKey` does not show its
secret in ``repr`` or ``str``, so it cannot leak through a log line by accident.

Example:
    >>> import secrets
    >>> key = MasterKey(secrets.token_bytes(32), origin="example")
    >>> len(key.fingerprint)
    16
    >>> key.subkey("tokens") != key.subkey("crosswalk")
    True
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from linkage.errors import HhlinkError

__all__ = [
    "ENV_KEY", "ENV_KEY_FILE", "MIN_KEY_BYTES", "MasterKey", "SecretKeyError", "KeyNotFoundError",
    "KeyFormatError", "KeyPermissionError", "KeyMismatchError", "default_key_path", "derive_key",
    "check_outside_workspace", "fingerprint", "init_key_file", "load_master_key", "project_key", "rotate",
]

log = logging.getLogger(__name__)

ENV_KEY = "HHLINK_KEY"
ENV_KEY_FILE = "HHLINK_KEY_FILE"
MIN_KEY_BYTES = 32
# a fixed, public HKDF salt: it separates hhlink's derivations from any other use of the secret
_HKDF_SALT = b"hhlink/key-derivation/v1"
_HEX = re.compile(r"^[0-9a-fA-F]+$")


class SecretKeyError(HhlinkError):
    """The master key is missing, malformed, too exposed, or not the key the data was written with."""


class KeyNotFoundError(SecretKeyError):
    """No master key was given: no key file, and no ``HHLINK_KEY`` in the environment."""


class KeyFormatError(SecretKeyError):
    """The key is not hex or base64, or is shorter than 32 bytes."""


class KeyPermissionError(SecretKeyError):
    """A key file is readable or writable by group or others, not a regular file, or inside the workspace."""


class KeyMismatchError(SecretKeyError):
    """The key's fingerprint differs from the one recorded with the data."""


def derive_key(master: bytes, purpose: str, length: int = 32) -> bytes:
    """Derive the subkey for one purpose with HKDF-SHA256.

    Args:
        master: the master secret (>= 32 bytes).
        purpose: ``"tokens"``, ``"bloom:<field>"``, ``"crosswalk"``, ``"project:<id>"`` or
            ``"fingerprint"``; any other non-empty label works but should be documented.
        length: subkey length in bytes.

    Returns:
        ``length`` bytes, a deterministic function of (master, purpose).

    Example:
        >>> derive_key(bytes(32), "tokens") == derive_key(bytes(32), "tokens")
        True
    """
    if not purpose:
        raise ValueError("a key purpose is required")
    if len(master) < MIN_KEY_BYTES:
        raise KeyFormatError(f"the master key must be at least {MIN_KEY_BYTES} bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=_HKDF_SALT,
                info=b"hhlink:" + purpose.encode("utf-8"))
    return hkdf.derive(master)


def fingerprint(master: bytes) -> str:
    """The key's public name: 16 hex characters derived (HKDF) from it, safe to record and show."""
    return derive_key(master, "fingerprint", 8).hex()


def project_key(master: bytes | MasterKey, project_id: str) -> bytes:
    """The 32-byte output key of one research project (HKDF purpose ``project:<id>``).

    Research extracts keyed with different projects' keys cannot be joined to each other.

    Example:
        >>> project_key(bytes(32), "p1") != project_key(bytes(32), "p2")
        True
    """
    if not project_id or not str(project_id).strip():
        raise ValueError("a research project id is required")
    secret = master.secret if isinstance(master, MasterKey) else master
    return derive_key(secret, f"project:{project_id}")


class MasterKey:
    """The master secret and where it came from; ``repr`` shows only the fingerprint."""

    __slots__ = ("_secret", "origin", "path")

    def __init__(self, secret: bytes, origin: str, path: Path | None = None):
        if len(secret) < MIN_KEY_BYTES:
            raise KeyFormatError(f"the key from {origin} is {len(secret)} bytes; at least "
                                 f"{MIN_KEY_BYTES} are required")
        self._secret = bytes(secret)
        self.origin = origin
        self.path = path

    @property
    def secret(self) -> bytes:
        """The raw master secret. Never write, log or print it."""
        return self._secret

    @property
    def fingerprint(self) -> str:
        """16 hex characters naming this key (see :func:`fingerprint`)."""
        return fingerprint(self._secret)

    def subkey(self, purpose: str, length: int = 32) -> bytes:
        """The HKDF subkey for ``purpose`` (see :func:`derive_key`)."""
        return derive_key(self._secret, purpose, length)

    def __repr__(self) -> str:
        return f"MasterKey(fingerprint={self.fingerprint}, origin={self.origin!r})"

    __str__ = __repr__

    def __reduce__(self):  # a key must not be pickled into a cache or a task result by accident
        raise TypeError("MasterKey cannot be pickled")


def default_key_path() -> Path:
    """``$XDG_CONFIG_HOME/hhlink/master.key``, or ``~/.config/hhlink/master.key``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "hhlink" / "master.key"


def _decode(text: str, origin: str) -> bytes:
    text = text.strip()
    if not text:
        raise KeyFormatError(f"the key from {origin} is empty")
    if _HEX.match(text) and len(text) % 2 == 0:
        secret = bytes.fromhex(text)
    else:
        try:
            secret = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            try:
                secret = base64.urlsafe_b64decode(text)
            except (binascii.Error, ValueError):
                raise KeyFormatError(f"the key from {origin} is neither hex nor base64") from None
    if len(secret) < MIN_KEY_BYTES:
        raise KeyFormatError(f"the key from {origin} is {len(secret)} bytes; at least {MIN_KEY_BYTES} "
                             "are required (hhlink keys init makes one)")
    return secret


def check_outside_workspace(path: Path, workspace: Path | str | None) -> None:
    """Refuse a key file inside ``workspace`` (keys live outside the zones they protect)."""
    if workspace is None:
        return
    try:
        path.resolve().relative_to(Path(workspace).resolve())
    except ValueError:
        return
    raise KeyPermissionError(f"key file {path} is inside the workspace {workspace}; keys must live "
                             "outside it (e.g. ~/.config/hhlink/master.key)")


def _read_key_file(path: Path) -> MasterKey:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeyNotFoundError(f"key file {path} not found (create one with: hhlink keys init "
                               f"--key-file {path})") from None
    except OSError as exc:
        raise KeyPermissionError(f"key file {path} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyPermissionError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyPermissionError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"refusing to use it: run chmod 600 {path}")
    folder = path.resolve().parent
    mode = stat.S_IMODE(os.stat(folder).st_mode)
    if mode & 0o022:
        # whoever can write the folder can swap the key file for their own between runs
        raise KeyPermissionError(f"key file {path} is in a folder others can write ({folder}, mode {mode:04o}); "
                                 f"move it to a private folder or run chmod go-w {folder}")
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFormatError(f"key file {path} cannot be read as text ({exc.__class__.__name__})") from None
    origin = f"key file {path}"
    return MasterKey(_decode(text, origin), origin=origin, path=path)


def load_master_key(key_file: Path | str | None = None, workspace: Path | str | None = None) -> MasterKey:
    """Load the master key from an explicit file, ``HHLINK_KEY``, ``HHLINK_KEY_FILE`` or the default file.

    Args:
        key_file: an explicit key file; wins over the environment.
        workspace: when given, a key file inside this folder is refused (keys live outside).

    Returns:
        The :class:`MasterKey`.

    Raises:
        KeyNotFoundError: no key anywhere.
        KeyFormatError: not hex/base64, or shorter than 32 bytes.
        KeyPermissionError: the file is accessible by group/others, or inside the workspace.

    Example:
        >>> load_master_key().origin          # with HHLINK_KEY set  # doctest: +SKIP
        'environment variable HHLINK_KEY'
    """
    if key_file is not None:
        path = Path(key_file).expanduser()
        check_outside_workspace(path, workspace)
        return _read_key_file(path)
    env = os.environ.get(ENV_KEY)
    if env is not None and env.strip():
        origin = f"environment variable {ENV_KEY}"
        return MasterKey(_decode(env, origin), origin=origin)
    env_file = os.environ.get(ENV_KEY_FILE)
    if env_file:
        path = Path(env_file).expanduser()
        check_outside_workspace(path, workspace)
        return _read_key_file(path)
    path = default_key_path()
    if not path.exists():
        raise KeyNotFoundError(
            f"no pseudonymisation key: set {ENV_KEY} or {ENV_KEY_FILE}, pass --key-file, or create "
            f"{path} with: hhlink keys init")
    check_outside_workspace(path, workspace)
    return _read_key_file(path)


def init_key_file(path: Path | str | None = None) -> MasterKey:
    """Create a new random 32-byte master key in a 0600 file; never overwrite an existing one.

    Args:
        path: where to write it; default :func:`default_key_path`. Missing parent folders
            are created with mode 0700.

    Returns:
        The new :class:`MasterKey` (its ``path`` is set).

    Raises:
        SecretKeyError: the file exists, or cannot be created.

    Example:
        >>> init_key_file("/tmp/hhlink-example.key").fingerprint  # doctest: +SKIP
        '3f9c0b6d2a1e4f70'
    """
    path = Path(path).expanduser() if path is not None else default_key_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SecretKeyError(f"cannot create the folder for key file {path} ({exc.strerror})") from None
    secret = secrets.token_bytes(MIN_KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SecretKeyError(f"key file {path} already exists; refusing to overwrite it "
                             "(data pseudonymised under it would become unlinkable)") from None
    except OSError as exc:
        raise SecretKeyError(f"cannot create key file {path} ({exc.strerror})") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secret.hex() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return MasterKey(secret, origin=f"key file {path}", path=path)


def rotate(config, workspace: Path | str, key_file: Path | str | None, new_key_file: Path | str) -> dict:
    """Re-pseudonymise a workspace under a new key, on purpose, and record the change.

    Args:
        config: the configuration.
        workspace: the workspace folder.
        key_file: the current key's file (or None: environment, default file).
        new_key_file: the new key's file.

    Returns:
        ``{"from", "to", "at"}``: the two fingerprints and the time, as appended to
        ``<workspace>/.flow/key-history.json``.

    Raises:
        KeyMismatchError: the current key is not the one ``pseudonymised/`` was written under,
            or the new key is the same key.
    """
    import json
    import time

    from linkage import lineage
    from linkage.stages import run_stage
    from linkage.workspace import FLOW_DIR, atomic_path, hold

    root = Path(workspace)
    old = load_master_key(key_file, workspace=root)
    new = load_master_key(new_key_file, workspace=root)
    with hold(root):
        recorded = (lineage.read_record(root, "pseudonymise") or {}).get("key")
        if recorded and recorded != old.fingerprint:
            raise KeyMismatchError(f"the current key (fingerprint {old.fingerprint}) is not the one pseudonymised/ "
                                   f"was written under ({recorded}): rotation needs the current key")
        if new.fingerprint == old.fingerprint:
            raise KeyMismatchError("the new key is the current key: nothing to rotate")
        run_stage("pseudonymise", config, root, key=new, rekey=True)
        change = {"from": old.fingerprint, "to": new.fingerprint, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = root / FLOW_DIR / "key-history.json"
        history = json.loads(path.read_text()) if path.exists() else []
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps([*history, change], indent=2) + "\n")
            tmp.chmod(0o600)
    log.info("re-keyed %s: %s -> %s", root, old.fingerprint, new.fingerprint)
    return change
