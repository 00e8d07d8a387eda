"""The root of the command line: the Typer app every command module adds to, the consoles, the
options commands share, and how a command fails (its message, its exit code).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from cicd_ray.errors import CicdError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="cicd-ray: run CI/CD pipelines on Ray."
)


# Piped output (CI logs, scripts) gets wide tables rather than rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


err = Console(stderr=True, highlight=False)


EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


LOG_TAIL_LINES = 20


URL = typer.Option(
    None, "--url", envvar="CICD_RAY_URL", help="the cicd-ray API (else the local store or Ray)"
)


ADDRESS = typer.Option(None, help="Ray cluster address (else RAY_ADDRESS, else embedded)")


AS_JSON = typer.Option(False, "--json", help="print JSON for scripts")


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise fail(f"--env {pair!r}: expected KEY=VALUE", EXIT_INVALID)
        env[key] = value
    return env


SECRET = typer.Option(
    [],
    "--secret",
    "-s",
    help="NAME: a secret of the run's own, its value "
    "taken from this shell's variable NAME (never from the command line)",
)


def secrets_from_env(names: list[str]) -> dict[str, str]:
    unset = [n for n in names if n not in os.environ]
    if unset:
        raise fail(
            f"--secret {unset[0]}: set the variable {unset[0]} in this shell to the "
            "secret's value (e.g. read -s); it is not taken from the command line",
            EXIT_INVALID,
        )
    return {n: os.environ[n] for n in names}


@contextmanager
def reported():
    """Our errors become a message on stderr and exit code 1."""
    try:
        yield
    except CicdError as e:
        raise fail(str(e)) from None


def parse_since(text: str, option: str = "--since") -> float:
    """`7d`, `12h`, `30m` or `90s` ago, as a Unix time."""
    from cicd_ray.store.retention import parse_duration

    try:
        return time.time() - parse_duration(text)
    except CicdError:
        raise typer.BadParameter(
            f"{text!r}: expected an age such as 7d, 12h, 30m or 90s", param_hint=option
        ) from None
