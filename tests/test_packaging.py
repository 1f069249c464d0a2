"""The built wheel in a fresh venv: a user's own pytest suite is untouched, and the opt-in plugin works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

# A user's suite that knows nothing of Tether's fixtures: it defines its own `clock`, and
# Tether must add no `hub` / `mock_ws` / `hub_config` fixture behind its back.
UNRELATED_SUITE = {
    "test_app.py": """
        import pytest

        @pytest.fixture
        def clock():
            return "the user's own clock"

        def test_arithmetic():
            assert 1 + 1 == 2

        def test_own_fixture_wins(clock):
            assert clock == "the user's own clock"

        @pytest.mark.parametrize("name", ["hub", "mock_ws", "hub_config"])
        def test_no_fixture_was_injected(request, name):
            with pytest.raises(pytest.FixtureLookupError):
                request.getfixturevalue(name)

        def test_tether_imports():
            import tether
            assert tether.Hub is not None
    """,
}

# A suite that opts in to the plugin and uses the fixtures that need pytest only.
SYNC_FIXTURES = """
    from tether import HubConfig, ManualClock
    from tether.testing import MockWebSocket

    def test_clock(clock):
        assert isinstance(clock, ManualClock)
        start = clock.now()
        clock.advance(5)
        assert clock.now() == start + 5

    def test_hub_config(hub_config):
        assert isinstance(hub_config, HubConfig)
        assert hub_config.backend == "memory"

    def test_mock_ws_runs_on_the_same_clock(mock_ws, clock):
        assert isinstance(mock_ws, MockWebSocket)
        assert mock_ws.clock is clock and mock_ws.sent == []
"""

HUB_FIXTURE = """
    import pytest
    from tether import Hub, SendStatus

    @pytest.mark.asyncio
    async def test_hub(hub, mock_ws):
        assert isinstance(hub, Hub)
        await hub.connect("alice", mock_ws)
        result = await hub.send("alice", "hi", critical=True)
        assert result.status is SendStatus.SENT
        assert mock_ws.sent == ["hi"]
"""


def _clean_env() -> dict[str, str]:
    """This process's environment without what would leak the project into the venv."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TETHER_", "PYTEST_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )


def _check(done: subprocess.CompletedProcess[str]) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{done.args!r} exited {done.returncode}:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel, as a user would install it."""
    out = tmp_path_factory.mktemp("wheel")
    _check(
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(ROOT)], ROOT)
    )
    (built,) = out.glob("tether-*.whl")
    return built


def _venv(where: Path, wheel: Path, *packages: str) -> Path:
    """A fresh venv (no system site-packages) with the wheel and `packages`; its python."""
    _check(_run([sys.executable, "-m", "venv", str(where)], where.parent))
    python = where / "bin" / "python"
    _check(_run([str(python), "-m", "pip", "install", "-q", str(wheel), *packages], where.parent))
    return python


@pytest.fixture(scope="module")
def bare_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install <wheel> pytest` in a fresh venv, nothing else."""
    return _venv(tmp_path_factory.mktemp("bare") / "venv", wheel, "pytest")


def _suite(where: Path, files: dict[str, str]) -> Path:
    where.mkdir()
    (where / "pytest.ini").write_text("[pytest]\n")  # this directory is the rootdir
    for name, text in files.items():
        (where / name).write_text(textwrap.dedent(text))
    return where


def test_fresh_install_leaves_an_unrelated_suite_alone(bare_python: Path, tmp_path: Path) -> None:
    check = "import importlib.util as u; print(u.find_spec('pytest_asyncio'))"
    assert _check(_run([str(bare_python), "-c", check], tmp_path)).strip() == "None"
    suite = _suite(tmp_path / "suite", UNRELATED_SUITE)

    output = _check(_run([str(bare_python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], suite))
    assert "6 passed" in output
    assert "tether" not in output.lower() and "warning" not in output.lower()

    fixtures = _check(_run([str(bare_python), "-m", "pytest", "--fixtures", "-q"], suite))
    assert "mock_ws" not in fixtures and "hub_config" not in fixtures


def test_version_is_defined_once(bare_python: Path, tmp_path: Path) -> None:
    script = (
        "import importlib.metadata as m, tether; print(m.version('tether'), tether.__version__)"
    )
    installed, module = _check(_run([str(bare_python), "-c", script], tmp_path)).split()
    assert installed == module
    shown = _check(_run([str(bare_python.parent / "tether"), "--version"], tmp_path))
    assert shown.strip() == f"tether {installed}"


@pytest.mark.parametrize("how", ["-p", "pytest_plugins"])
def test_opt_in_plugin_provides_its_fixtures_without_pytest_asyncio(
    bare_python: Path, tmp_path: Path, how: str
) -> None:
    files = {"test_fixtures.py": SYNC_FIXTURES}
    args = [str(bare_python), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if how == "-p":
        args += ["-p", "tether.testing.plugin"]
    else:
        files["conftest.py"] = 'pytest_plugins = ["tether.testing.plugin"]\n'
    suite = _suite(tmp_path / "suite", files)
    assert "3 passed" in _check(_run(args, suite))


def test_hub_fixture_without_pytest_asyncio_names_what_to_install(
    bare_python: Path, tmp_path: Path
) -> None:
    suite = _suite(tmp_path / "suite", {"test_hub.py": HUB_FIXTURE})
    done = _run(
        [
            str(bare_python),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tether.testing.plugin",
        ],
        suite,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "1 error" in output
    assert "needs pytest-asyncio" in output and "pip install pytest-asyncio" in output


def test_hub_fixture_with_pytest_asyncio(
    wheel: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    python = _venv(tmp_path_factory.mktemp("asyncio") / "venv", wheel, "pytest", "pytest-asyncio")
    suite = _suite(tmp_path / "suite", {"test_hub.py": HUB_FIXTURE})
    args = [
        str(python),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "tether.testing.plugin",
    ]
    assert "1 passed" in _check(_run(args, suite))
