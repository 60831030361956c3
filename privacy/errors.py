"""The one exception base of medfed and its kinds; every CLI maps them to exit codes.

An error medfed raises on purpose is a :class:`MedfedError`. Its message names the file or
field, the cause and the fix, and never an identifying value. Anything else that escapes is
a defect (exit 1, with a traceback for the report). The kinds:

==================  ====  ===========================================================
kind                exit  meaning
==================  ====  ===========================================================
``InputError``      2     bad input the user can fix: a config field, an argument, a file
``RefusedError``    3     the site (or the verifier) refused: policy, budget, a protocol check
``IntegrityError``  4     evidence is damaged or was tampered with: ledger, log, key, bundle
``ServiceError``    5     a service or peer did not answer as needed: sites missing, enrolment
==================  ====  ===========================================================

Subclasses keep their historical Python bases too (``ValueError``, ``RuntimeError``...), so
code that catches those still does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class MedfedError(Exception):
    """Base of every error medfed raises on purpose."""

    exit_code = 1


class InputError(MedfedError):
    """Bad input the user can fix (exit 2)."""

    exit_code = 2


class RefusedError(MedfedError):
    """A request refused by policy, budget or a protocol check (exit 3)."""

    exit_code = 3


class IntegrityError(MedfedError):
    """Damaged or tampered evidence: a ledger, a log, a key, a bundle (exit 4)."""

    exit_code = 4


class ServiceError(MedfedError):
    """A service or peer did not answer as needed (exit 5)."""

    exit_code = 5


def one_line(exc: MedfedError) -> str:
    """The message a CLI prints for ``exc``: its kind and its text on one line."""
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())


def run_cli(app: Callable[..., Any], prog_name: str) -> None:
    """Run a console command; a :class:`MedfedError` that escapes it is one line on stderr and
    its kind's exit code (anything else stays a defect, with its traceback)."""
    try:
        app(prog_name=prog_name)
    except MedfedError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
