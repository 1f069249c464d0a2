"""A short soak in CI: chaos over real sockets, and every critical message delivered once or reported lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.soak import report, run_soak  # noqa: E402


@pytest.mark.benchmark
@pytest.mark.slow
async def test_short_soak_delivers_exactly_once_or_reports_loss() -> None:
    figures = await run_soak(duration=14, clients=6, seed=11, restarts=1, rate=250)
    print(report(figures))
    assert figures.violations == []
    # the run really exercised what it claims to
    assert figures.critical_sent > 2000
    assert figures.critical_delivered + figures.critical_dropped_by_restart >= figures.critical_sent
    assert figures.duplicates_delivered == 0 and figures.critical_unaccounted == 0
    assert figures.restarts == 1 and figures.resets_seen >= 1
    assert figures.server_aborts > 0 and figures.client_aborts > 0 and figures.reconnects > 0
    assert figures.bad_frames > 0 and figures.floods > 0 and figures.stalls_cut_off >= 1
    assert figures.tracked_clients_after_cleanup == 0


@pytest.mark.benchmark
@pytest.mark.slow
def test_tether_soak_command_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tether",
            "soak",
            "--duration",
            "3",
            "--clients",
            "3",
            "--seed",
            "5",
            "--restarts",
            "0",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result     OK" in done.stdout
    figures = json.loads(out.read_text())
    assert figures["ok"] is True and figures["violations"] == []
    assert figures["critical_sent"] > 0 and figures["tracked_clients_after_cleanup"] == 0


def test_the_check_catches_duplicates_silent_loss_and_strays() -> None:
    from benchmarks.soak import Peer, Soak

    soak = Soak(duration=1, clients=1, seed=1, restarts=0, rate=1)
    peer = Peer(client=None)  # type: ignore[arg-type]
    peer.client = type("C", (), {"duplicates": 0, "reconnects": 0})()  # type: ignore[assignment]
    peer.expected = {"a", "b", "c", "d"}
    peer.delivered.update({"a": 2, "b": 1, "x": 1})
    peer.lost = 1  # one of c, d reported lost; the other vanished silently
    soak.peers = {"soak-0": peer}
    soak.verify()
    text = "\n".join(soak.figures.violations)
    assert "delivered twice: ['a']" in text
    assert "never accepted: ['x']" in text
    assert "2 critical messages missing, only 1 reported lost" in text
    assert soak.figures.critical_unaccounted == 1 and not soak.figures.ok
