"""Settings from defaults, a TOML file, SSEPROXY_* variables and flags (issue 2, point 6)."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sseproxy import config
from sseproxy.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sseproxy.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_without_file_or_environment() -> None:
    s = config.load(environ={})
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8080)
    assert s.upstream.kind == "mock" and s.upstream_url == ""
    assert s.heartbeat.interval_s == 15.0
    assert s.personas == config.EXAMPLE_PERSONAS


def test_example_personas_without_a_personas_table_and_a_table_replaces_them(
    tmp_path: Path,
) -> None:
    # issue 12: `make run` starts with example personas; a file's [personas] replaces them
    assert set(config.load(environ={}).personas) == {"fortune-teller", "pirate", "concise"}
    no_table = write(tmp_path, "[server]\nport = 9000\n")
    assert config.load(no_table, environ={}).personas == config.EXAMPLE_PERSONAS
    own = write(tmp_path, "[personas.poet]\nsystem = 'Answer in verse.'\n")
    assert config.load(own, environ={}).personas == {"poet": config.Persona("Answer in verse.")}
    empty = write(tmp_path, "[personas]\n")
    assert config.load(empty, environ={}).personas == {}


def test_file_values_are_typed(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [server]
        port = 9000
        [upstream]
        kind = "openai"
        base_url = "http://127.0.0.1:1234/v1/"
        idle_timeout_s = 5
        [personas.pirate]
        system = "Talk like a pirate."
        model = "gpt-pirate"
        title = "Pirate"
    """)
    s = config.load(path, environ={})
    assert s.server.port == 9000
    assert s.upstream.idle_timeout_s == 5.0 and isinstance(s.upstream.idle_timeout_s, float)
    assert s.upstream_url == "http://127.0.0.1:1234/v1"
    assert s.personas["pirate"] == config.Persona("Talk like a pirate.", "gpt-pirate", "Pirate")
    assert s.source == path


def test_openai_kind_defaults_to_the_openai_url() -> None:
    s = config.load(environ={"SSEPROXY_UPSTREAM_KIND": "openai"})
    assert s.upstream_url == "https://api.openai.com/v1"


def test_precedence_is_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [server]
        port = 9000
        host = "127.0.0.2"
        [heartbeat]
        interval_s = 3
    """)
    env = {"SSEPROXY_SERVER_PORT": "9001", "SSEPROXY_HEARTBEAT_INTERVAL_S": "4.5"}
    s = config.load(path, environ=env, overrides={"server.port": 9002})
    assert s.server.port == 9002
    assert s.server.host == "127.0.0.2"
    assert s.heartbeat.interval_s == 4.5


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 7000\n")
    assert config.load(environ={"SSEPROXY_CONFIG": path}).server.port == 7000


def test_environment_key_with_underscores_maps_to_the_first_section() -> None:
    s = config.load(environ={"SSEPROXY_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1"})
    assert s.upstream.base_url == "http://127.0.0.1:9/v1"


@pytest.mark.parametrize("text, value", [("true", True), ("0", False), ("on", True)])
def test_environment_booleans(text: str, value: bool) -> None:
    s = config.load(environ={"SSEPROXY_LOGGING_LOG_PROMPTS": text})
    assert s.logging.log_prompts is value


@pytest.mark.parametrize(
    "toml, needles",
    [
        ("[server]\nport = 'eighty'", ["server.port", "'eighty'", "integer"]),
        ("[server]\nport = 70000", ["server.port", "70000", "at most 65535"]),
        ("[heartbeat]\ninterval_s = -1", ["heartbeat.interval_s", "-1", "at least"]),
        ("[upstream]\nkind = 'gemini'", ["upstream.kind", "'gemini'", "'mock', 'openai'"]),
        ("[logging]\nformat = 'xml'", ["logging.format", "'xml'", "'json'"]),
        ("[logging]\nlog_prompts = 'yes'", ["logging.log_prompts", "true or false"]),
        ("[server]\nprot = 1", ["unknown key", "server.prot", "did you mean 'port'"]),
        ("[hartbeat]\ninterval_s = 1", ["unknown section", "hartbeat", "heartbeat"]),
        ("[upstream]\nbase_url = 'ftp://x'", ["upstream.base_url", "http://"]),
        ("[upstream]\nkind = 'local'\nbase_url = 'http://x'", ["upstream.base_url", "local"]),
        ("[personas.x]\nmodel = 'm'", ["personas.x.system", "non-empty"]),
        ("[personas.x]\nsystem = 's'\nsytem = 't'", ["personas.x.sytem", "system"]),
        ("[server]\nport = [", ["not valid TOML"]),
        ("[pacing]\nunit = 'sentence'", ["pacing.unit", "'sentence'", "'grapheme'"]),
        ("[server]\nevent_loop = 'trio'", ["server.event_loop", "'trio'", "'uvloop'"]),
        ("[pacing]\nmax_events_per_s = 0", ["pacing.max_events_per_s", "at least"]),
        ("[pacing]\ntarget_lag_s = 2\nmax_lag_s = 1", ["pacing.max_lag_s", "target_lag_s"]),
    ],
)
def test_invalid_file_values_name_key_value_and_what_is_allowed(
    tmp_path: Path, toml: str, needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, toml), environ={})
    for needle in needles:
        assert needle in info.value.message


def test_invalid_environment_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match="upstream.idle_timeout_s = 'soon'"):
        config.load(environ={"SSEPROXY_UPSTREAM_IDLE_TIMEOUT_S": "soon"})


def test_unknown_environment_variable_names_the_nearest() -> None:
    with pytest.raises(ConfigError, match="SSEPROXY_UPSTRAEM_MODEL"):
        config.load(environ={"SSEPROXY_UPSTRAEM_MODEL": "x"})
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        config.load(environ={"SSEPROXY_UPSTREAM_MODLE": "x"})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path / "nope.toml"), environ={})


#: Every way a config file can be unusable (issue 12 point 4, issue 13 point 7), and what
#: the error says about it. Each makes a file at ``path`` (a FIFO is made where it would be).
UNUSABLE: dict[str, str] = {
    "missing": "not found",
    "directory": "is a directory",
    "fifo": "not a regular file",
    "not_utf8": "not valid UTF-8",
    "bad_toml": "not valid TOML",
    "too_deep": "nested too deeply",
}


def make_unusable(path: Path, kind: str) -> None:
    """Turn ``path`` into an unusable config file of this ``kind`` (see :data:`UNUSABLE`)."""
    if path.is_dir():
        path.rmdir()
    elif path.exists() or path.is_fifo():
        path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "not_utf8":
        path.write_bytes(b"[upstream]\nmodel = \"caf\xe9\"\n")  # Latin-1, as editors save
    elif kind == "bad_toml":
        path.write_text("[server]\nport = [\n")
    elif kind == "too_deep":
        path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    else:
        assert kind == "missing"


@pytest.mark.parametrize("kind", sorted(UNUSABLE))
def test_an_unusable_config_file_is_a_config_error_naming_the_file(
    tmp_path: Path, kind: str
) -> None:
    # issue 12 point 4: a file that is not UTF-8 escaped as a UnicodeDecodeError; a FIFO
    # blocked the reader until a writer came (issue 13 point 7)
    path = tmp_path / "sseproxy.toml"
    make_unusable(path, kind)
    with pytest.raises(ConfigError) as info:
        config.load(str(path), environ={})
    assert repr(str(path)) in info.value.message
    assert UNUSABLE[kind] in info.value.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_config_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = Path(write(tmp_path, "[server]\nport = 1\n"))
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot be read: Permission denied") as info:
        config.load(str(path), environ={})
    assert repr(str(path)) in info.value.message


class _FailingFile(io.BytesIO):
    def read(self, size: int | None = -1) -> bytes:
        raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("when", ["load", "reload"])
@pytest.mark.parametrize("step, needle", [
    ("open", "cannot be read: Permission denied"),
    ("read", "cannot be read: Input/output error"),
])
def test_a_config_file_the_system_refuses_is_a_config_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str, step: str, needle: str
) -> None:
    # issue 12 point 4 (permissions): root reads any file whatever its mode, so the refusal
    # is made where the system makes it, at the open (EACCES) or at the read (EIO)
    path = write(tmp_path, "[server]\nport = 9000\n")
    current = config.load(path, environ={})
    real_open, real_fdopen = os.open, os.fdopen

    def refusing_open(name: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if step == "open" and os.fspath(name) == path:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(name, flags, *args, **kwargs)

    def failing_fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        if step == "read":
            os.close(fd)
            return _FailingFile()
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "fdopen", failing_fdopen)
    with pytest.raises(ConfigError, match=needle) as info:
        if when == "load":
            config.load(path, environ={})
        else:
            config.reload(current, environ={})
    assert repr(path) in info.value.message


def test_api_key_comes_from_the_named_variable_and_only_for_openai() -> None:
    s = config.load(environ={"SSEPROXY_UPSTREAM_KIND": "openai",
                             "SSEPROXY_UPSTREAM_API_KEY_ENV": "MY_KEY"})
    assert config.api_key(s, {"MY_KEY": "sk-1"}) == "sk-1"
    assert config.api_key(s, {}) is None
    assert config.api_key(config.load(environ={}), {"OPENAI_API_KEY": "sk-1"}) is None


def test_check_config_prints_effective_settings(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9100\n[personas.a]\nsystem = 's'\n")
    out = subprocess.run([sys.executable, "-m", "sseproxy", "check-config", path],
                         capture_output=True, text=True, timeout=30, check=True)
    shown = json.loads(out.stdout)
    assert shown["server"]["port"] == 9100
    assert shown["personas"]["a"]["system"] == "s"


def test_check_config_rejects_a_bad_file_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = -3\n")
    out = subprocess.run([sys.executable, "-m", "sseproxy", "check-config", path],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "server.port = -3" in out.stderr


def test_serve_rejects_an_unknown_flag_key() -> None:
    out = subprocess.run([sys.executable, "-m", "sseproxy", "serve", "--set", "server.prot=1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "did you mean 'port'" in out.stderr


def test_pacing_from_the_environment() -> None:
    s = config.load(environ={"SSEPROXY_PACING_MODE": "off", "SSEPROXY_PACING_UNIT": "word"})
    assert (s.pacing.mode, s.pacing.unit) == ("off", "word")


def test_reload_applies_pacing_heartbeat_stall_personas_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n[pacing]\nmode = 'off'\n")
    old = config.load(path, environ={})
    write(tmp_path, """
        [server]
        port = 9001
        [pacing]
        mode = "smooth"
        [heartbeat]
        interval_s = 2
        [personas.a]
        system = "s"
    """)
    new, applied, need_restart = config.reload(old, environ={})
    assert (new.pacing.mode, new.heartbeat.interval_s) == ("smooth", 2.0)
    assert new.personas["a"].system == "s"
    assert new.server.port == 9000  # needs a restart: the old value stays
    # the file's [personas] replaced the built-in examples: those count as changed too
    assert applied == ["heartbeat.interval_s", "pacing.mode", "personas.a", "personas.concise",
                       "personas.fortune-teller", "personas.pirate"]
    assert need_restart == ["server.port"]


def test_reload_of_a_bad_file_raises_and_changes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, "[pacing]\nmode = 'off'\n")
    old = config.load(path, environ={})
    write(tmp_path, "[pacing]\nmode = 'fast'\n")
    with pytest.raises(ConfigError, match="pacing.mode = 'fast'"):
        config.reload(old, environ={})
    assert old.pacing.mode == "off"
