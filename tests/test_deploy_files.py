"""The shipped deployment files (issue 5): ``deploy/sseproxy.toml`` is a complete example
config whose values are the defaults, and ``deploy/sseproxy.service`` is a sound systemd
unit whose stop timeout leaves room for the graceful-shutdown grace period."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from sseproxy import config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "deploy" / "sseproxy.toml"
UNIT_FILE = ROOT / "deploy" / "sseproxy.service"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SSEPROXY_") and k != "OPENAI_API_KEY"}


def field_default(cls: type[Any], name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            assert f.default is not dataclasses.MISSING, f"{cls.__name__}.{name} has no default"
            return f.default
    pytest.fail(f"{cls.__name__} has no field {name!r}")


# --- deploy/sseproxy.toml -------------------------------------------------------------------


def raw_example() -> dict[str, Any]:
    with open(EXAMPLE_CONFIG, "rb") as f:
        return tomllib.load(f)


def test_example_config_lists_every_key_with_its_default() -> None:
    raw = raw_example()
    settings = config.load(str(EXAMPLE_CONFIG), environ={})
    assert set(raw) == {*config.SECTIONS, "personas"}, "sections of deploy/sseproxy.toml"
    for section, cls in config.SECTIONS.items():
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in raw[section]]
        assert not missing, f"deploy/sseproxy.toml lacks {[f'{section}.{n}' for n in missing]}"
        loaded = getattr(settings, section)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            default = field_default(cls, f.name)
            assert getattr(loaded, f.name) == default, f"{key} is not its default {default!r}"
            # Written as the field's own TOML type (30.0 for a float, not 30), so the
            # example also documents what kind of value each key takes.
            toml_type = list if isinstance(default, tuple) else type(default)
            assert type(raw[section][f.name]) is toml_type, (
                f"{key} = {raw[section][f.name]!r}: write it as a {type(default).__name__}"
            )
    # its personas are the built-in examples, so the file is exactly no file at all
    assert dataclasses.replace(settings, source=None) == config.Settings()


def test_example_config_shutdown_grace_is_documented() -> None:
    # Named in DESIGN.md; the unit's TimeoutStopSec depends on it (test below).
    assert raw_example()["server"]["shutdown_grace_s"] == field_default(
        config.ServerSettings, "shutdown_grace_s")


def test_example_config_personas_parse() -> None:
    settings = config.load(str(EXAMPLE_CONFIG), environ={})
    raw = raw_example()["personas"]
    assert settings.personas, "the example has at least one [personas.NAME] table"
    assert set(settings.personas) == set(raw)
    for name, persona in settings.personas.items():
        assert persona.system.strip()
        assert persona.system == raw[name]["system"]
        assert persona.title == raw[name].get("title")
        assert persona.model == raw[name].get("model")


def test_example_config_holds_no_secret() -> None:
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    raw = raw_example()
    assert raw["upstream"]["api_key_env"] == "OPENAI_API_KEY"
    assert "api_key" not in raw["upstream"]
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            assert not re.search(r"sk-[A-Za-z0-9]", line), f"a key-like value: {line!r}"


def test_check_config_accepts_the_example() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sseproxy", "check-config", str(EXAMPLE_CONFIG)],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    expected = config.describe(config.load(str(EXAMPLE_CONFIG), environ={}))
    assert printed == json.loads(json.dumps(expected))


# --- deploy/sseproxy.service ----------------------------------------------------------------

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """A small systemd unit-file parser: ``[Section]`` headers, ``Key=Value`` lines (a key
    may repeat: every value is kept, in order), ``#``/``;`` comments and ``\\``
    continuation lines. Anything else is an error."""
    unit: Unit = {}
    section: str | None = None
    pending = ""
    for number, line in enumerate(text.splitlines(), 1):
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.endswith("\\"):
            pending = stripped[:-1].rstrip()
            continue
        if stripped.startswith("["):
            assert stripped.endswith("]"), f"line {number}: bad section header {line!r}"
            section = stripped[1:-1]
            assert section not in unit, f"line {number}: section [{section}] repeated"
            unit[section] = {}
            continue
        key, sep, value = stripped.partition("=")
        assert sep and key.strip(), f"line {number}: expected Key=Value, got {line!r}"
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"line {number}: {key!r}"
        assert section is not None, f"line {number}: a key before any [Section]"
        unit[section].setdefault(key.strip(), []).append(value.strip())
    assert not pending, "the file ends with a continuation line"
    return unit


def test_parse_unit() -> None:
    unit = parse_unit("# c\n[A]\nX=1\nX = 2\n; c\nY=a \\\n  b\nZ=\n[B]\nW=v=w\n")
    assert unit == {"A": {"X": ["1", "2"], "Y": ["a b"], "Z": [""]}, "B": {"W": ["v=w"]}}


_SPAN_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "": 1.0, "s": 1.0,
               "sec": 1.0, "second": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0,
               "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hr": 3600.0, "hour": 3600.0,
               "hours": 3600.0}


def time_span(text: str) -> float:
    """A systemd time span in seconds: ``45``, ``45s``, ``1min 30s``."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and re.fullmatch(r"(\s*\d+(\.\d+)?\s*[a-z]*)+\s*", text), f"time span {text!r}"
    return sum(float(n) * _SPAN_UNITS[u] for n, u in parts)


def test_time_span() -> None:
    assert time_span("45") == 45.0
    assert time_span("45s") == 45.0
    assert time_span("1min 30s") == 90.0
    assert time_span("500ms") == 0.5


def unit_file() -> Unit:
    return parse_unit(UNIT_FILE.read_text(encoding="utf-8"))


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"deploy/sseproxy.service: [{section}] has no {key}="
    return values[-1]  # the last assignment wins in systemd (for single-valued keys)


def test_unit_sections() -> None:
    unit = unit_file()
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in one(unit, "Unit", "After")


def test_unit_runs_sseproxy_with_the_config() -> None:
    unit = unit_file()
    assert one(unit, "Service", "Type") in ("simple", "exec")
    start = unit["Service"]["ExecStart"]
    assert len(start) == 1, "one ExecStart for Type=simple/exec"
    argv = start[0].split()
    assert argv[0] == "/opt/sseproxy/.venv/bin/sseproxy"
    assert "serve --config" in start[0]
    assert argv[argv.index("--config") + 1] == "/etc/sseproxy/sseproxy.toml"
    reload = one(unit, "Service", "ExecReload")
    assert "-HUP" in reload.split() and "$MAINPID" in reload, "SIGHUP re-reads the config"
    assert one(unit, "Service", "EnvironmentFile") == "-/etc/sseproxy/env"
    service = unit["Service"]
    assert "User" in service or one(unit, "Service", "DynamicUser") == "yes", "never as root"
    if "User" in service:
        assert one(unit, "Service", "User") != "root"


def test_unit_restarts_and_stops_gracefully() -> None:
    unit = unit_file()
    assert one(unit, "Service", "Restart") in ("on-failure", "on-abnormal", "always")
    assert time_span(one(unit, "Service", "RestartSec")) > 0
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    # mixed: SIGTERM to the master only (it forwards it to its workers). With
    # control-group, workers would get a second SIGTERM from the master, which means
    # "exit at once" and skips the grace period.
    assert one(unit, "Service", "KillMode") == "mixed"
    fields = {f.name: f for f in dataclasses.fields(config.ServerSettings)}
    assert "shutdown_grace_s" in fields, (
        "config.ServerSettings has no shutdown_grace_s: TimeoutStopSec cannot be checked "
        "against the graceful-shutdown grace period"
    )
    grace = fields["shutdown_grace_s"].default
    assert isinstance(grace, float)
    stop = time_span(one(unit, "Service", "TimeoutStopSec"))
    # The grace period, the pacer's drain, closing connections (2 s) and exit must fit.
    assert stop >= grace + 5, f"TimeoutStopSec={stop:g} s must exceed the {grace:g} s grace"


def test_unit_limits_and_hardening() -> None:
    unit = unit_file()
    nofile = int(one(unit, "Service", "LimitNOFILE"))
    max_streams = field_default(config.LimitsSettings, "max_streams")
    assert nofile >= 4 * max_streams, "one fd per stream and per upstream connection, and more"
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert one(unit, "Service", key) == value, f"{key}={value}"
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "ReadWritePaths" not in unit["Service"], "sseproxy writes no files"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on a copy whose ExecStart is /bin/true (it checks that
    the binaries exist). Where systemd-analyze is not installed this test is skipped and
    only the parser checks above run."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; the parser checks cover the unit")
    lines = []
    for line in UNIT_FILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("ExecStart="):
            line = "ExecStart=/bin/true"
        elif line.startswith("ExecReload=") and not os.access("/bin/kill", os.X_OK):
            line = "ExecReload=/bin/true"
        lines.append(line)
    copy = tmp_path / "sseproxy.service"
    copy.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # verify reports unknown keys and unparsable values as warnings with exit status 0.
    about_unit = [line for line in output.splitlines() if str(copy) in line]
    assert not about_unit, "\n".join(about_unit)
