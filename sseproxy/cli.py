"""The ``sseproxy`` command: ``serve`` (the default), ``check-config FILE``, ``mock-upstream``,
``create-key NAME``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, config, keys, logs, mockupstream, workers
from .errors import ConfigError

COMMANDS = ("serve", "check-config", "mock-upstream", "create-key")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sseproxy",
        description="A streaming relay for LLM chat (OpenAI-compatible upstream in, SSE out).",
    )
    parser.add_argument("--version", action="version", version=f"sseproxy {__version__}")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="serve the API (default)")
    serve.add_argument("--config", help="TOML config file (default: $SSEPROXY_CONFIG)")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--workers", type=int, help="processes (server.workers)")
    serve.add_argument("--upstream-url", help="OpenAI-compatible base URL (upstream.base_url)")
    serve.add_argument(
        "--upstream", choices=("mock", "openai", "local"),
        help="the simulator, an OpenAI-compatible API, or the local model (upstream.kind)")
    serve.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override any config key (repeatable)",
    )

    check = sub.add_parser("check-config", help="validate a config file and print the settings")
    check.add_argument("file")

    mock = sub.add_parser("mock-upstream", help="run the OpenAI-compatible simulator")
    mockupstream.add_arguments(mock)

    create = sub.add_parser(
        "create-key", help="make a client key: print it once, and its line for auth.keys_file")
    create.add_argument("name", help="the key's name (shown in logs, counted by limits)")
    create.add_argument("--keys-file", help="append the line to this file (created 0600 "
                        "if missing) instead of printing it")
    return parser


def create_key(name: str, keys_file: str | None) -> int:
    """``sseproxy create-key``: the key on stdout; its line on stdout or into the file."""
    keys.check_name(name)
    key = keys.new_key()
    line = keys.key_line(name, key)
    if keys_file is None:
        print(key)
        print(line)
        print("# add the second line to auth.keys_file; the key above is shown only once",
              file=sys.stderr)
        return 0
    if os.path.exists(keys_file):
        with open(keys_file, encoding="utf-8") as f:
            text = f.read()
        if name in keys.parse_keys(text, keys_file):
            raise ConfigError(f"keys file {keys_file!r} already has a key named {name!r}")
        prefix = "" if not text or text.endswith("\n") else "\n"
    else:
        prefix = ""
    fd = os.open(keys_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{prefix}{line}\n")
    print(key)
    print(f"# {name} added to {keys_file}; send SIGHUP (or restart) so sseproxy reads it",
          file=sys.stderr)
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, key in (("host", "server.host"), ("port", "server.port"),
                      ("workers", "server.workers"), ("upstream_url", "upstream.base_url"),
                      ("upstream", "upstream.kind")):
        value = getattr(args, flag)
        if value is not None:
            out[key] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        out[key.strip()] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv.insert(0, "serve")
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            settings = config.load(args.file)
            print(json.dumps(config.describe(settings), indent=2))
            return 0
        if args.command == "mock-upstream":
            return mockupstream.run(args)
        if args.command == "create-key":
            return create_key(args.name, args.keys_file)
        overrides = _overrides(args)
        settings = config.load(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"sseproxy: configuration error: {exc.message}", file=sys.stderr)
        return 2
    logs.configure(settings.logging)
    return workers.run(settings, overrides)
