"""Import layers: every module under src/tether imports only its own layer and the layers below."""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"

# Lowest first. A name ending in ".*" covers a package and every module in it; any other name
# is one module. Every module under src/tether must be listed (a new module gets a layer).
LAYERS: list[tuple[str, list[str]]] = [
    (
        "foundation",
        [
            "tether.protocol",
            "tether.messages",
            "tether.config",
            "tether.clock",
            "tether.access",
            "tether.errors",
            "tether._version",
        ],
    ),
    ("policies", ["tether.resilience.*", "tether.metrics"]),
    ("transport contract", ["tether.transports", "tether.transports.base"]),
    ("backends", ["tether.backends.*"]),
    ("channels", ["tether.channels.*"]),
    (
        "core",
        [
            "tether.hub",
            "tether.hub_channels",
            "tether.accounting",
            "tether.best_effort",
            "tether.cluster",
            "tether.connections",
            "tether.envelopes",
            "tether.fanout",
            "tether.pipeline",
            "tether.registry",
            "tether.resume",
            "tether.session",
            "tether.shutdown",
            "tether.streams",
            "tether.tasks",
            "tether.writes",
        ],
    ),
    (
        "adapters and auth",
        [
            "tether.transports.websockets",
            "tether.transports.starlette",
            "tether.transports.connection",
            "tether.transports.guard",
            "tether.auth",
            "tether.client",
            "tether.subscription",
        ],
    ),
    ("monitoring", ["tether.monitoring.*"]),
    ("testing", ["tether.testing.*"]),
    ("entry points", ["tether", "tether.__main__", "tether.cli", "tether.bench", "tether.demo"]),
]

# Upward imports that are known and tolerated, each (importer, imported module) with why.
# Remove an entry when its import goes: the test fails on an entry that no longer happens,
# and on every upward import that is not listed here.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path, root: Path) -> str:
    """`tether.transports.base` for root/tether/transports/base.py; a package is its __init__."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, package: str = "tether") -> dict[str, Path]:
    """Every module of `package` under `root`, by dotted name."""
    return {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """(line, module) for each import of a module in `known`, wherever it appears in the file
    (function bodies and TYPE_CHECKING blocks included: a type is a dependency too)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                # `from . import protocol` imports the module tether.protocol
                submodule = f"{source}.{alias.name}"
                if submodule in known:
                    yield node.lineno, submodule
                elif source in known:
                    yield node.lineno, source


def layer_of(name: str, layers: list[tuple[str, list[str]]]) -> int | None:
    """The index of the layer `name` belongs to, None when no layer lists it."""
    for index, (_, members) in enumerate(layers):
        for member in members:
            if member.endswith(".*"):
                package = member[:-2]
                if name == package or name.startswith(package + "."):
                    return index
            elif name == member:
                return index
    return None


def upward_imports(
    root: Path, layers: list[tuple[str, list[str]]]
) -> tuple[list[str], dict[tuple[str, str], str]]:
    """(modules no layer lists, {(importer, imported): "file:line importer (layer) -> ..."})
    for every import of a module from a higher layer."""
    found = modules(root)
    known = set(found)
    unmapped = sorted(name for name in found if layer_of(name, layers) is None)
    upward: dict[tuple[str, str], str] = {}
    for name, path in found.items():
        own = layer_of(name, layers)
        if own is None:
            continue
        for line, target in imported_modules(name, path, known):
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > own:
                where = f"{path.relative_to(root)}:{line}"
                upward.setdefault(
                    (name, target),
                    f"{where} {name} ({layers[own][0]}) imports {target} ({layers[theirs][0]})",
                )
    return unmapped, upward


def test_every_module_has_a_layer() -> None:
    unmapped, _ = upward_imports(SRC, LAYERS)
    assert unmapped == [], f"give these modules a layer in LAYERS: {unmapped}"


def test_no_module_imports_a_higher_layer() -> None:
    _, upward = upward_imports(SRC, LAYERS)
    new = [text for pair, text in sorted(upward.items()) if pair not in KNOWN_EXCEPTIONS]
    assert new == [], "imports from a higher layer:\n" + "\n".join(new)


def test_known_exceptions_still_happen() -> None:
    _, upward = upward_imports(SRC, LAYERS)
    gone = [
        f"{a} -> {b} ({why})" for (a, b), why in KNOWN_EXCEPTIONS.items() if (a, b) not in upward
    ]
    assert gone == [], "these imports are gone; remove them from KNOWN_EXCEPTIONS:\n" + "\n".join(
        gone
    )


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_sees_every_kind_of_upward_import(tmp_path: Path) -> None:
    layers = [("low", ["tether.base", "tether.util.*"]), ("high", ["tether", "tether.top"])]
    _write(
        tmp_path,
        {
            "tether/__init__.py": "from .top import Top\n",
            "tether/top.py": "from .base import Base\nfrom . import util\n",
            "tether/util/__init__.py": "",
            # each of these reaches up to tether.top:
            "tether/base.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .top import Top\n",
            "tether/util/relative.py": "from .. import top\n",
            "tether/util/absolute.py": "import tether.top\n",
            "tether/util/local.py": "def f():\n    from tether.top import Top\n",
            "tether/util/root.py": "from .. import something_in_init\n",
            "tether/extra.py": "",
        },
    )
    unmapped, upward = upward_imports(tmp_path, layers)
    assert unmapped == ["tether.extra"]
    assert set(upward) == {
        ("tether.base", "tether.top"),
        ("tether.util.relative", "tether.top"),
        ("tether.util.absolute", "tether.top"),
        ("tether.util.local", "tether.top"),
        ("tether.util.root", "tether"),
    }
    assert upward[("tether.base", "tether.top")] == (
        "tether/base.py:3 tether.base (low) imports tether.top (high)"
    )


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("tether.resilience.outbox", "policies"),
        ("tether.transports.base", "transport contract"),
        ("tether.transports.connection", "adapters and auth"),
        ("tether.backends", "backends"),
        ("tether", "entry points"),
    ],
)
def test_layer_of(name: str, layer: str) -> None:
    index = layer_of(name, LAYERS)
    assert index is not None and LAYERS[index][0] == layer


def _doc_references() -> tuple[set[str], set[str]]:
    """(`src/tether/...` paths, `tether.x.y` dotted names) quoted in docs/architecture.md."""
    quoted = re.findall(r"`([^`]+)`", ARCHITECTURE_DOC.read_text())
    paths = {q for q in quoted if q.startswith("src/tether/")}
    dotted = {q for q in quoted if re.fullmatch(r"tether(\.[A-Za-z_][A-Za-z0-9_]*)+", q)}
    return paths, dotted


def _resolve(dotted: str) -> object:
    """The object a dotted name names: the longest importable module prefix, then attributes.
    Raises ImportError or AttributeError when it names nothing."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ImportError(dotted)


def test_architecture_doc_names_only_modules_that_exist() -> None:
    paths, _ = _doc_references()
    assert len(paths) > 40  # the layer map is there and was parsed
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert missing == [], f"docs/architecture.md names modules that do not exist: {missing}"


def test_architecture_doc_lists_every_module() -> None:
    paths, _ = _doc_references()
    on_disk = {path.relative_to(ROOT).as_posix() for path in (SRC / "tether").rglob("*.py")}
    assert sorted(on_disk - paths) == [], "add these modules to docs/architecture.md"


def test_architecture_doc_names_only_functions_that_exist() -> None:
    _, dotted = _doc_references()
    assert "tether.pipeline.DeliveryPipeline.write_head" in dotted
    missing = []
    for name in sorted(dotted):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert missing == [], f"docs/architecture.md names what does not exist: {missing}"
