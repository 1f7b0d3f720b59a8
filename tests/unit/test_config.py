from __future__ import annotations

from pathlib import Path

import pytest

from minilb import config
from minilb.cli import join_prefill_ports, parse_prefill
from minilb.errors import ConfigError

SERVERS = {"prefill": [{"url": "http://127.0.0.1:30000", "bootstrap_port": 30001}],
           "decode": [{"url": "http://127.0.0.1:31000"}]}


def test_defaults_and_round_trip() -> None:
    cfg = config.build(**SERVERS)
    assert cfg.policy == "round_robin" and cfg.timeout_secs == 1800 and cfg.workers == 1
    assert config.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"prefill": [], "decode": SERVERS["decode"]}, "no prefill server"),
        ({"prefill": SERVERS["prefill"], "decode": []}, "no decode server"),
        ({**SERVERS, "prefill": [{"url": "localhost:30000"}]}, "'localhost:30000' is not http://host:port"),
        ({**SERVERS, "decode": [{"url": "https://x:1"}]}, "https"),
        ({**SERVERS, "decode": [{"url": "http://x:1/v1"}]}, "path"),
        ({**SERVERS, "decode": [{"url": "http://x:99999"}]}, "invalid port"),
        ({**SERVERS, "prefill": [{"url": "http://x:1", "bootstrap_port": 0}]}, "$.prefill[0].bootstrap_port"),
        ({**SERVERS, "workers": 0}, "$.workers"),
        ({**SERVERS, "policy": "fastest"}, "$.policy"),
        ({**SERVERS, "timeout_secs": 0}, "$.timeout_secs"),
        ({**SERVERS, "decode": [{"url": "http://x:1"}, {"url": "http://x:1/"}]}, "listed twice"),
        ({**SERVERS, "colour": "blue"}, "colour"),
    ],
)
def test_errors_name_the_field_and_rule(values: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.build(**values)
    assert words in str(info.value)


def test_toml_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(
        'host = "0.0.0.0"\nport = 8080\ntimeout_secs = 30\n'
        '[[prefill]]\nurl = "http://10.0.0.1:30000"\nbootstrap_port = 30001\n'
        '[[decode]]\nurl = "http://10.0.0.2:31000"\n'
    )
    cfg = config.load_file(path, port=9000, workers=None)
    assert (cfg.host, cfg.port, cfg.timeout_secs, cfg.workers) == ("0.0.0.0", 9000, 30, 1)
    assert cfg.prefill[0].bootstrap_port == 30001


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load_file(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load_file(tmp_path / "missing.toml")


def test_from_env() -> None:
    cfg = config.build(**SERVERS)
    assert config.from_env({config.CONFIG_JSON_ENV: cfg.to_json()}) == cfg
    with pytest.raises(ConfigError, match="MINILB_CONFIG"):
        config.from_env({})


@pytest.mark.parametrize(
    ("url", "host"),
    [("http://[::1]:30000", "[::1]"), ("http://10.0.0.1:1", "10.0.0.1"), ("http://pf-0:1", "pf-0")],
)
def test_bootstrap_host(url: str, host: str) -> None:
    assert config.bootstrap_host(url) == host


def test_sgl_router_prefill_syntax() -> None:
    argv = ["serve", "--prefill", "http://a:1", "9001", "--prefill", "http://b:2", "--decode",
            "http://c:3", "--prefill", "http://d:4", "none"]
    assert join_prefill_ports(argv) == ["serve", "--prefill", "http://a:1 9001", "--prefill",
                                        "http://b:2", "--decode", "http://c:3", "--prefill",
                                        "http://d:4 none"]
    assert parse_prefill("http://a:1 9001") == {"url": "http://a:1", "bootstrap_port": 9001}
    assert parse_prefill("http://a:1 none") == {"url": "http://a:1", "bootstrap_port": None}
    assert parse_prefill("http://a:1") == {"url": "http://a:1", "bootstrap_port": None}
    with pytest.raises(ConfigError, match="not a number"):
        parse_prefill("http://a:1 x9")
