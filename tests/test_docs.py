"""The docs keep up with the code: every setting and every error code is documented."""

from __future__ import annotations

import re
from pathlib import Path

from tether.config import HubConfig, env_name

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "tether"

# Codes raised only locally, never sent in an `error` frame.
LOCAL_ONLY_CODES = {"closed"}  # ServerProtocol used after the connection closed


def test_every_setting_is_in_the_configuration_guide() -> None:
    guide = (ROOT / "docs" / "configuration.md").read_text()
    # a row of one of the tables: | `TETHER_X` | default | range | meaning |
    documented = set(re.findall(r"^\| `(TETHER_[A-Z0-9_]+)` \|", guide, flags=re.M))
    expected = {env_name(name) for name in HubConfig.model_fields}
    assert expected - documented == set(), "undocumented settings"
    assert documented - expected == set(), "documented settings that do not exist"


def test_every_error_code_is_in_the_protocol_table() -> None:
    spec = (ROOT / "docs" / "protocol.md").read_text()
    table = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{4}) \|", spec, flags=re.M))
    raised: dict[str, set[int]] = {}
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for code in re.findall(r'ProtocolError\(\s*"([a-z_]+)"', text):
            raised.setdefault(code, set())
    missing = set(raised) - set(table) - LOCAL_ONLY_CODES
    assert missing == set(), f"error codes raised but not in docs/protocol.md §7: {missing}"
    assert {"unauthorized", "forbidden_client_id", "rate_limited", "unavailable"} <= set(table)
    assert table["rate_limited"] == table["forbidden_client_id"] == table["unauthorized"] == "1008"
    assert table["unavailable"] == "1013"


def test_security_guide_names_each_defence_with_its_setting() -> None:
    guide = (ROOT / "docs" / "security.md").read_text()
    for needle in (
        "TETHER_AUTH_SECRET",
        "TETHER_ALLOWED_ORIGINS",
        "TETHER_MAX_CONNECTIONS",
        "TETHER_MAX_CLIENTS",
        "TETHER_MAX_INBOUND_RATE",
        "TETHER_MAX_MESSAGE_SIZE",
        "TETHER_HELLO_TIMEOUT",
        "TETHER_SEND_TIMEOUT",
        "TETHER_MONITOR_TOKEN",
        "TETHER_API_TOKEN",
        "forbidden_client_id",
        "rate_limited",
        "1013",
        "403",
    ):
        assert needle in guide, needle
