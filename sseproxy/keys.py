"""Client keys and the checks around them: pure functions, no I/O but reading the keys file.

* A client key is a random secret (:func:`new_key`); sseproxy keeps only its SHA-256, in
  ``auth.keys_file``: one ``name:sha256hex`` per line, ``#`` comments and blank lines
  allowed. Every bad line is a :class:`~sseproxy.errors.ConfigError` naming the file and
  the line. :func:`verify` compares the digest of a presented key with every stored digest
  in constant time (``hmac.compare_digest``, all of them, whichever matches).
* A session (the chat page's cookie) carries the key's name and the first characters of its
  digest (:func:`session_value`), so replacing or removing a key in the file (then SIGHUP)
  ends the sessions made with the old one. Tornado signs and dates the value.
* :func:`same_origin` decides whether a state-changing request that a browser sent with the
  session cookie came from the page itself (``Sec-Fetch-Site``, else ``Origin``).
* :func:`is_loopback` says whether a listen address is reachable from this host only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Mapping
from urllib.parse import urlsplit

from .errors import ConfigError

#: A key's name: what logs show and what limits count against.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LINE = re.compile(r"^([^:]*):([0-9a-fA-F]*)$")
#: Prefix of every key :func:`new_key` makes (recognisable in a leaked file or a paste).
PREFIX = "sxp_"
#: Largest keys file read.
MAX_KEYS_FILE_BYTES = 4 << 20
#: Characters of the key's hex digest a session cookie carries.
SESSION_DIGEST_CHARS = 16


def digest(key: str) -> bytes:
    """The SHA-256 of a key, as stored (hex) in the keys file."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def new_key() -> str:
    """A new client key: 256 random bits, URL-safe."""
    return PREFIX + secrets.token_urlsafe(32)


def key_line(name: str, key: str) -> str:
    """The keys-file line of ``key``."""
    return f"{name}:{digest(key).hex()}"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ConfigError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return name


def parse_keys(text: str, path: str) -> dict[str, bytes]:
    """``{name: sha256 digest}`` from the text of a keys file; a bad line is a ConfigError."""
    keys: dict[str, bytes] = {}
    seen: dict[bytes, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"keys file {path!r}, line {number}"
        match = _LINE.match(line)
        if match is None or len(match[2]) != 64:
            raise ConfigError(f"{where}: expected NAME:SHA256 (64 hex digits); "
                              "`sseproxy create-key NAME` prints such a line")
        name, value = match[1], bytes.fromhex(match[2])
        if not NAME.match(name):
            raise ConfigError(f"{where}: key name {name!r}: use 1-64 letters, digits, '.', "
                              "'_' or '-'")
        if name in keys:
            raise ConfigError(f"{where}: the name {name!r} is already used on an earlier line")
        if value in seen:
            raise ConfigError(f"{where}: the same key as {seen[value]!r}")
        keys[name] = value
        seen[value] = name
    return keys


def read_keys(path: str) -> dict[str, bytes]:
    """Read and parse ``auth.keys_file``; every way it is unusable is a ConfigError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(f"keys file {path!r} (auth.keys_file) not found; "
                          f"`sseproxy create-key NAME --keys-file {path}` creates it") from None
    except OSError as exc:
        raise ConfigError(f"keys file {path!r} cannot be read: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"keys file {path!r} is not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = f.read(MAX_KEYS_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"keys file {path!r} cannot be read: {exc.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_KEYS_FILE_BYTES:
        raise ConfigError(f"keys file {path!r} is larger than {MAX_KEYS_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"keys file {path!r} is not valid UTF-8 (byte {exc.start})") from None
    return parse_keys(text, path)


def verify(keys: Mapping[str, bytes], key: str) -> str | None:
    """The name of ``key`` in ``keys``, or None. Every stored digest is compared, in
    constant time, so the time taken says nothing about which digest came close."""
    presented = digest(key)
    found = None
    for name, stored in keys.items():
        if hmac.compare_digest(presented, stored):
            found = name
    return found


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def session_value(name: str, keys: Mapping[str, bytes]) -> str:
    """What the session cookie carries for the key ``name`` (before Tornado signs it)."""
    return f"{name}:{keys[name].hex()[:SESSION_DIGEST_CHARS]}"


def session_user(value: str, keys: Mapping[str, bytes]) -> str | None:
    """The key name of a (verified) session value, or None when its key is gone or was
    replaced since the session began."""
    name, _, prefix = value.partition(":")
    stored = keys.get(name)
    if stored is None or len(prefix) != SESSION_DIGEST_CHARS:
        return None
    if not hmac.compare_digest(stored.hex()[:SESSION_DIGEST_CHARS], prefix):
        return None
    return name


def same_origin(sec_fetch_site: str | None, origin: str | None, scheme: str,
                host: str | None) -> bool:
    """Whether a browser request came from a page of this very origin.

    ``Sec-Fetch-Site`` is the browser's own answer (``same-origin``, or ``none`` when the
    user typed the URL); without it, ``Origin`` must name this scheme and host. A request
    with neither header did not come from a current browser's page (SameSite=Strict keeps
    the cookie off cross-site requests in older ones), so it passes.
    """
    if sec_fetch_site:
        return sec_fetch_site.strip().lower() in ("same-origin", "none")
    if not origin:
        return True
    if origin == "null" or not host:
        return False
    parts = urlsplit(origin)
    default = {"http": 80, "https": 443}
    try:
        port = parts.port or default.get(parts.scheme)
    except ValueError:
        return False
    own = urlsplit(f"{scheme}://{host}")
    try:
        own_port = own.port or default.get(scheme)
    except ValueError:
        return False
    return (parts.scheme, (parts.hostname or "").lower(), port) == \
        (scheme, (own.hostname or "").lower(), own_port)


def is_loopback(host: str) -> bool:
    """Whether a listen address (``server.host``) accepts connections from this host only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "" (every address) or a host name that may resolve anywhere
