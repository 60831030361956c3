"""The house rule, checked on the source: medfed uses Flower, Opacus and pydicom through their
public APIs only. No import of a private (``_``) name or module of theirs, no ``_`` attribute
read off their modules or objects we hold by their names, and no assignment to a method
(``obj.forward = ...``) outside our own classes. Any ``_`` attribute of an object that is not
``self`` or ``cls`` counts, whoever made it, unless listed (with why) in ``OWN_PRIVATES``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
ENGINES = ("flwr", "opacus", "pydicom")
PACKAGES = ("client", "server", "privacy")
# ``name.attr`` reads allowed although ``attr`` starts with "_": documented public, or medfed's own class
OWN_PRIVATES = frozenset({
    "os._exit",  # the documented way to end a forked child without running the parent's cleanup
    "store._replay",  # client.dicom.store.IngestStore, inside its own classmethod
})
METHODS = frozenset({"forward", "backward", "step", "zero_grad", "__call__", "clip_and_accumulate", "add_noise"})


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def violations(tree: ast.AST, where: str) -> list[str]:
    """What in one module's syntax tree breaks the rule."""
    found: list[str] = []
    engine_names: set[str] = set()  # local names bound to an engine's module or object
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ENGINES:
                    engine_names.add((alias.asname or alias.name).split(".")[0])
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(f"{where}:{node.lineno}: imports private module {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ENGINES:
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(f"{where}:{node.lineno}: imports from private module {node.module}")
            for alias in node.names:
                engine_names.add(alias.asname or alias.name)
                if alias.name.startswith("_"):
                    found.append(f"{where}:{node.lineno}: imports private name {alias.name} from {node.module}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute | ast.Call | ast.Subscript):
                base = base.func if isinstance(base, ast.Call) else base.value
            name = base.id if isinstance(base, ast.Name) else "?"
            if name not in ("self", "cls") and f"{name}.{node.attr}" not in OWN_PRIVATES:
                kind = "of an engine" if name in engine_names else "of an object medfed does not own"
                found.append(f"{where}:{node.lineno}: private attribute {node.attr} of {name} ({kind})")
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in METHODS and not (
                        isinstance(t.value, ast.Name) and t.value.id in ("self", "cls")):
                    found.append(f"{where}:{node.lineno}: assigns to method {t.attr} of an object")
    return found


def test_no_engine_internals_in_the_source() -> None:
    found = [v for p in _sources() for v in violations(ast.parse(p.read_text()), str(p.relative_to(ROOT)))]
    assert found == []


def test_the_scan_catches_what_the_rule_forbids() -> None:
    """The scan is not vacuous: each kind of violation, as it once appeared in this tree, is caught."""
    bad = '''
import pydicom
from pydicom.filereader import data_element_generator as gen, _read_file_meta_info
from opacus.grad_sample import _private_mod
import flwr._internal
charset = ds._character_set if pydicom else None
enc = pydicom.charset._python_encoding
layer.forward = functools.partial(f, layer)
gs_module._close = closer
'''
    found = violations(ast.parse(bad), "bad.py")
    assert any("private name _read_file_meta_info" in v for v in found)
    assert any("imports private module flwr._internal" in v for v in found)
    assert any("private attribute _python_encoding of pydicom (of an engine)" in v for v in found)
    assert any("private attribute _character_set of ds" in v for v in found)
    assert any("private attribute _close of gs_module" in v for v in found)
    assert any("assigns to method forward" in v for v in found)
    assert violations(ast.parse("self.forward = self._fast\nos._exit(0)\n"), "ok.py") == []


def import_time_settings(tree: ast.Module, where: str) -> list[str]:
    """Module-level statements that change process-wide state when the module is imported: an
    engine's settings, a logger's level, the environment."""
    found = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        for t in targets:
            root = t
            while isinstance(root, ast.Attribute | ast.Subscript):
                root = root.value
            if isinstance(root, ast.Name) and root.id in (*ENGINES, "os", "logging", "torch", "warnings"):
                found.append(f"{where}:{node.lineno}: assigns {ast.unparse(t)} at import")
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            call = ast.unparse(node.value.func)
            if call.endswith((".setLevel", ".setdefault", ".update", ".simplefilter", ".filterwarnings",
                              "set_num_threads", ".putenv")) or call.startswith("os.environ"):
                found.append(f"{where}:{node.lineno}: calls {call} at import")
    return found


def test_no_process_wide_settings_at_import() -> None:
    """pydicom's validation mode, loggers and the environment are set where they are needed
    (scoped, or at the point of use), never as a side effect of importing a medfed module."""
    found = [v for p in _sources() for v in import_time_settings(ast.parse(p.read_text()), str(p.relative_to(ROOT)))]
    assert found == []
    old_reader = '''
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
os.environ["RAY_DEDUP_LOGS"] = "0"
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
'''
    assert len(import_time_settings(ast.parse(old_reader), "old.py")) == 4
