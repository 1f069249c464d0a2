"""HubConfig: contract defaults, TETHER_* environment and `.env` parsing, unknown names refused
with a suggestion, and errors that name the source of a bad value (keyword, flag, variable, file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tether import ConfigError, HubConfig
from tether.config import env_name

CONTRACT_DEFAULTS = {
    "max_queue_size": 1000,
    "overflow_policy": "drop_oldest",
    "message_ttl": 300,
    "retry_interval": 1,
    "retry_base_delay": 1,
    "retry_max_delay": 60,
    "max_retries": 5,
    "failure_threshold": 5,
    "success_threshold": 2,
    "recovery_timeout": 60,
    "half_open_max_calls": 3,
    "dedup_mode": "id",
    "dedup_window": 300,
    "dedup_max_entries": 100000,
    "send_timeout": 5,
    "heartbeat_interval": 20,
    "heartbeat_timeout": 20,
    "client_ttl": 3600,
    "cleanup_interval": 300,
    "metrics_enabled": True,
    "backend": "memory",
    "redis_url": "redis://127.0.0.1:6379/0",
    "max_message_size": 1048576,
    "monitor_token": None,
    "api_token": None,
    "host": "127.0.0.1",
    "port": 8765,
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("TETHER_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # a working directory with no `.env` unless a test writes one


def test_every_contract_variable_has_its_seed_default() -> None:
    config = HubConfig()
    for field, expected in CONTRACT_DEFAULTS.items():
        value = getattr(config, field)
        value = getattr(value, "value", value)
        assert value == expected, (
            f"{env_name(field)} default is {value!r}, contract says {expected!r}"
        )


def test_environment_variables_set_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_MAX_QUEUE_SIZE", "42")
    monkeypatch.setenv("TETHER_OVERFLOW_POLICY", "reject")
    monkeypatch.setenv("TETHER_DEDUP_MODE", "content")
    monkeypatch.setenv("TETHER_METRICS_ENABLED", "false")
    monkeypatch.setenv("TETHER_MONITOR_TOKEN", "s3cret-token")
    monkeypatch.setenv("TETHER_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    config = HubConfig()
    assert config.max_queue_size == 42
    assert config.overflow_policy.value == "reject"
    assert config.dedup_mode.value == "content"
    assert config.metrics_enabled is False
    assert config.monitor_token == "s3cret-token"
    assert config.allowed_origins == ["https://a.example", "https://b.example"]


def test_keyword_arguments_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_MAX_RETRIES", "9")
    assert HubConfig(max_retries=2).max_retries == 2


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TETHER_MAX_QUEUE_SIZE", "-1"),
        ("TETHER_MAX_QUEUE_SIZE", "lots"),
        ("TETHER_OVERFLOW_POLICY", "drop_everything"),
        ("TETHER_DEDUP_MODE", "sha1"),
        ("TETHER_RETRY_BASE_DELAY", "0"),
        ("TETHER_SEND_TIMEOUT", "-5"),
        ("TETHER_BACKEND", "postgres"),
        ("TETHER_REDIS_URL", "http://127.0.0.1:6379"),
        ("TETHER_PORT", "70000"),
        ("TETHER_METRICS_ENABLED", "perhaps"),
        ("TETHER_API_TOKEN", "short"),
    ],
)
def test_bad_value_fails_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as excinfo:
        HubConfig()
    assert variable in str(excinfo.value)


def test_inconsistent_retry_delays_are_refused() -> None:
    with pytest.raises(ConfigError, match="retry_max_delay"):
        HubConfig(retry_base_delay=10, retry_max_delay=5)


def test_unknown_keyword_is_refused_blaming_the_keyword() -> None:
    with pytest.raises(ConfigError) as excinfo:
        HubConfig(max_queue=5)  # type: ignore[call-arg]
    message = str(excinfo.value)
    assert "HubConfig(max_queue=...): no such setting; did you mean max_queue_size?" in message
    assert "TETHER_" not in message  # no environment variable was involved


def test_unknown_environment_variable_is_refused_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TETHER_MAX_QUEUE", "5")
    monkeypatch.setenv("TETHER_SEND_TIMOUT", "3")
    with pytest.raises(ConfigError) as excinfo:
        HubConfig()
    message = str(excinfo.value)
    assert (
        "TETHER_MAX_QUEUE (environment variable): no such setting; "
        "did you mean TETHER_MAX_QUEUE_SIZE?" in message
    )
    assert "did you mean TETHER_SEND_TIMEOUT?" in message


def test_unknown_name_far_from_every_setting_points_to_the_guide(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TETHER_XYZZY", "1")
    with pytest.raises(ConfigError, match=r"TETHER_XYZZY .*see docs/configuration\.md"):
        HubConfig()


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# comments and other programs' variables are fine\n"
        "DATABASE_URL=postgres://example\n"
        "TETHER_MAX_QUEUE_SIZE=7\n"
        "TETHER_OVERFLOW_POLICY=reject\n"
    )
    config = HubConfig()
    assert config.max_queue_size == 7
    assert config.overflow_policy.value == "reject"


def test_environment_wins_over_dotenv_and_keywords_win_over_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("TETHER_MAX_QUEUE_SIZE=7\n")
    monkeypatch.setenv("TETHER_MAX_QUEUE_SIZE", "9")
    assert HubConfig().max_queue_size == 9
    assert HubConfig(max_queue_size=3).max_queue_size == 3


def test_bad_value_in_dotenv_names_the_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("TETHER_MAX_QUEUE_SIZE=-5\n")
    with pytest.raises(ConfigError) as excinfo:
        HubConfig()
    assert f"TETHER_MAX_QUEUE_SIZE (in {tmp_path / '.env'}): " in str(excinfo.value)
    assert "(got '-5')" in str(excinfo.value)


def test_unknown_name_in_dotenv_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("TETHER_MAX_QUEUE=5\n")
    with pytest.raises(ConfigError) as excinfo:
        HubConfig()
    assert (
        f"TETHER_MAX_QUEUE (in {tmp_path / '.env'}): no such setting; "
        "did you mean TETHER_MAX_QUEUE_SIZE?" in str(excinfo.value)
    )


def test_bad_keyword_value_blames_the_keyword(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_PORT", "8000")  # valid, and not the culprit
    with pytest.raises(ConfigError) as excinfo:
        HubConfig(port=70000)
    assert "HubConfig(port=...): Input should be less than or equal to 65535 (got 70000)" in str(
        excinfo.value
    )
    assert "TETHER_PORT" not in str(excinfo.value)


def test_bad_environment_value_names_the_variable_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_PORT", "70000")
    with pytest.raises(ConfigError, match=r"TETHER_PORT \(environment variable\): "):
        HubConfig()


def test_flag_value_blames_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_PORT", "8000")
    with pytest.raises(ConfigError) as excinfo:
        HubConfig.from_flags({"port": ("--port", 70000)})
    assert "--port (command-line flag): " in str(excinfo.value)
    assert "TETHER_PORT" not in str(excinfo.value)
    assert HubConfig.from_flags({"port": ("--port", 9000)}).port == 9000  # flag beats env


def test_tether_serve_blames_its_port_flag(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TETHER_")}
    done = subprocess.run(
        [sys.executable, "-m", "tether", "serve", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "TETHER_PORT": "8000"},
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "--port (command-line flag): Input should be less than or equal to 65535" in done.stderr


def test_tether_serve_refuses_an_unknown_variable_before_listening(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TETHER_")}
    (tmp_path / ".env").write_text("TETHER_MAX_QUEUE_SIZE=-5\n")
    done = subprocess.run(
        [sys.executable, "-m", "tether", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "TETHER_MAX_QUEUE": "5"},
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "did you mean TETHER_MAX_QUEUE_SIZE?" in done.stderr
    assert "listening" not in done.stdout


def test_config_is_immutable() -> None:
    config = HubConfig()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        config.max_queue_size = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- Redis topology


def test_redis_topology_defaults_to_one_server() -> None:
    config = HubConfig()
    assert config.redis_cluster is False
    assert config.redis_sentinels == ()
    assert config.redis_sentinel_service == "mymaster"
    assert config.redis_max_connections == 64


def test_redis_topology_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_REDIS_SENTINELS", "10.0.0.1:26379, sentinel-b:26380,[::1]:5000")
    monkeypatch.setenv("TETHER_REDIS_SENTINEL_SERVICE", "tether-primary")
    monkeypatch.setenv("TETHER_REDIS_MAX_CONNECTIONS", "8")
    config = HubConfig()
    assert config.redis_sentinels == (
        ("10.0.0.1", 26379),
        ("sentinel-b", 26380),
        ("::1", 5000),
    )
    assert config.redis_sentinel_service == "tether-primary"
    assert config.redis_max_connections == 8


def test_redis_cluster_flag_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_REDIS_CLUSTER", "true")
    monkeypatch.setenv("TETHER_REDIS_URL", "redis://10.0.0.7:7000/0")
    config = HubConfig()
    assert config.redis_cluster is True
    assert config.redis_url == "redis://10.0.0.7:7000/0"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TETHER_REDIS_SENTINELS", "sentinel-without-port"),
        ("TETHER_REDIS_SENTINELS", "10.0.0.1:26379,10.0.0.2:notaport"),
        ("TETHER_REDIS_SENTINELS", "10.0.0.1:0"),
        ("TETHER_REDIS_SENTINELS", ":26379"),
        ("TETHER_REDIS_SENTINEL_SERVICE", "two words"),
        ("TETHER_REDIS_MAX_CONNECTIONS", "0"),
        ("TETHER_REDIS_CLUSTER", "sometimes"),
    ],
)
def test_bad_redis_topology_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as excinfo:
        HubConfig()
    assert variable in str(excinfo.value)


def test_cluster_and_sentinel_together_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_REDIS_CLUSTER", "true")
    monkeypatch.setenv("TETHER_REDIS_SENTINELS", "127.0.0.1:26379")
    with pytest.raises(ConfigError) as excinfo:
        HubConfig()
    assert "TETHER_REDIS_CLUSTER" in str(excinfo.value)
    assert "TETHER_REDIS_SENTINELS" in str(excinfo.value)


def test_cluster_mode_refuses_a_unix_socket_url() -> None:
    with pytest.raises(ConfigError, match="TETHER_REDIS_URL"):
        HubConfig(redis_cluster=True, redis_url="unix:///run/redis.sock")
