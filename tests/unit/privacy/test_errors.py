"""One exception base: every error class medfed defines is a MedfedError of a kind, and each
CLI turns one that escapes a command into one line and its kind's exit code."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import typer

import client
import privacy
import server
from privacy.errors import InputError, IntegrityError, MedfedError, RefusedError, ServiceError, run_cli


def _modules() -> list[str]:
    names = []
    for pkg in (client, server, privacy):
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return names


def test_every_error_medfed_defines_is_a_medfed_error_of_one_kind() -> None:
    defined = {}
    for name in _modules():
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name and not cls_name.startswith("_"):
                defined[f"{name}.{cls_name}"] = cls
    assert len(defined) >= 25
    kinds = (InputError, RefusedError, IntegrityError, ServiceError)
    stray = [n for n, cls in defined.items() if not issubclass(cls, MedfedError)]
    assert stray == []
    unkinded = [n for n, cls in defined.items() if cls not in (MedfedError, *kinds) and not issubclass(cls, kinds)]
    assert unkinded == []
    from client.dicom import SiteDataError
    from privacy.dp import BudgetExhausted
    from privacy.ledger import LedgerCorruptError
    from server.messaging import NotEnoughSitesError
    assert (SiteDataError.exit_code, BudgetExhausted.exit_code, LedgerCorruptError.exit_code,
            NotEnoughSitesError.exit_code) == (2, 3, 4, 5)
    assert issubclass(LedgerCorruptError, IntegrityError) and issubclass(SiteDataError, InputError)


def test_a_medfed_error_escaping_a_command_is_one_line_and_its_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    app = typer.Typer()

    @app.command()
    def refuse(kind: str = "refused") -> None:
        if kind == "refused":
            raise RefusedError("the budget is spent:\n  run `medfed-site budget` to see it")
        raise KeyError("a defect")

    with pytest.raises(SystemExit) as info:
        run_cli(lambda **kw: app(args=["--kind", "refused"], standalone_mode=True, **kw), "medfed-test")
    assert info.value.code == 3
    err = capsys.readouterr().err
    assert err == "error: RefusedError: the budget is spent: run `medfed-site budget` to see it\n"
    with pytest.raises(KeyError):  # a defect is not dressed up as an input error
        run_cli(lambda **kw: app(args=["--kind", "bug"], standalone_mode=True, **kw), "medfed-test")
