"""Node program configuration: TOML keys, flag overrides, and what reaches the node."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cocoon_p2p.nodes import config as config_mod
from cocoon_p2p.nodes.cli import _node_config, build_parser

from cocoon_p2p.core.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "nodes" / "example-worker.toml"


def test_the_example_worker_config_loads_with_every_commented_key_too(tmp_path: Path) -> None:
    assert config_mod.load(EXAMPLE, {}).capacity == 8
    uncommented = re.sub(r"(?m)^# ([a-z_]+ = )", r"\1", EXAMPLE.read_text())  # every "# key = value"
    (tmp_path / "all.toml").write_text(uncommented)
    cfg = config_mod.load(tmp_path / "all.toml", {})
    assert cfg.max_connections_per_ip == 64 and cfg.jobs_per_client == 0 and cfg.chain


def test_client_and_resource_limits_reach_the_node(tmp_path: Path) -> None:
    (tmp_path / "w.toml").write_text("jobs_per_client = 2\nmax_connections_per_ip = 4\n")
    args = build_parser().parse_args(["worker", "--config", str(tmp_path / "w.toml"), "--jobs-per-client", "3"])
    overrides = {k: getattr(args, k, None) for k in config_mod.RoleConfig.__dataclass_fields__}
    node = _node_config(config_mod.load(args.config, overrides))
    assert node.jobs_per_client == 3  # the flag wins over the file
    assert node.limits.max_connections_per_ip == 4 and node.limits.max_connections_per_peer == 3
    assert _node_config(config_mod.load(None, {})).jobs_per_client is None  # 0: up to capacity
    (tmp_path / "bad.toml").write_text("max_connections_per_peer = 0\n")
    with pytest.raises(ConfigError, match="max_connections_per_peer"):
        _node_config(config_mod.load(tmp_path / "bad.toml", {}))


def test_the_payment_linger_is_a_short_delay(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("pay_linger_s = 0.05\n")
    assert config_mod.load(tmp_path / "c.toml", {}).pay_linger_s == 0.05
    assert config_mod.load(None, {}).pay_linger_s == 0.2
    for bad in ("-0.1", "5", '"soon"'):
        (tmp_path / "bad.toml").write_text(f"pay_linger_s = {bad}\n")
        with pytest.raises(ConfigError, match="pay_linger_s"):
            config_mod.load(tmp_path / "bad.toml", {})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('capacity = "8"', "capacity must be an integer, not '8' (str)"),
        ("capacity = 8.5", "capacity must be an integer"),
        ("capacity = true", "capacity must be an integer"),  # TOML's booleans are not numbers here
        ('announce_interval_s = "10"', "announce_interval_s must be a number"),
        ("log_json = 1", "log_json must be true or false"),
        ("bootstrap = [1, 2]", "bootstrap must be a string or a list of strings"),
        ('chain = ["a"]', "chain must be a string"),
        ("completion_price_nanoton = 1.5", "completion_price_nanoton must be an integer"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_at_load_naming_its_key(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "c.toml").write_text(line + "\n")
    with pytest.raises(ConfigError) as err:
        config_mod.load(tmp_path / "c.toml", {})
    assert message in str(err.value)


def test_values_take_their_fields_types_at_load(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('models = "minilm"\nidle_close_s = 60\ndata_dir = "d"\n')
    cfg = config_mod.load(tmp_path / "c.toml", {})
    assert cfg.models == ["minilm"]  # one name reads naturally as a string
    assert cfg.idle_close_s == 60.0 and isinstance(cfg.idle_close_s, float)
    assert cfg.data_dir == Path("d") and cfg.completion_price_nanoton is None


def test_the_environment_and_the_data_dirs_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``$COCOON_DATA_DIR`` and ``<data-dir>/config.toml`` stand in for flags; the API key
    comes from the environment or a file, never only from a command line."""
    d = tmp_path / "node"
    d.mkdir()
    (d / "config.toml").write_text("capacity = 3\nchain_api_key_file = 'key.txt'\n")
    (tmp_path / "key.txt").write_text("secret-from-file\n")
    env = {"COCOON_DATA_DIR": str(d)}
    monkeypatch.chdir(tmp_path)  # the key file's relative path
    cfg = config_mod.load(None, {}, env)
    assert cfg.data_dir == d and cfg.capacity == 3 and cfg.chain_api_key == "secret-from-file"
    cfg = config_mod.load(None, {}, {**env, "COCOON_CHAIN_API_KEY": "from-env"})
    assert cfg.chain_api_key == "from-env"  # the environment before the file
    cfg = config_mod.load(None, {"data_dir": tmp_path / "other", "chain_api_key": "flag"}, env)
    assert cfg.data_dir == tmp_path / "other" and cfg.capacity == 8  # the flag's folder has no config.toml
    assert cfg.chain_api_key == "flag"
    (tmp_path / "c.toml").write_text("capacity = 5\n")
    assert config_mod.load(None, {}, {**env, "COCOON_CONFIG": str(tmp_path / "c.toml")}).capacity == 5
    (tmp_path / "key.txt").write_text("")
    with pytest.raises(ConfigError, match="cannot read a key from key.txt"):
        config_mod.load(None, {}, env)
    assert config_mod.default_data_dir({}) == Path("cocoon-data")
    assert config_mod.default_data_dir(env) == d


@pytest.mark.parametrize(
    ("role", "env", "listen", "relays_for_others", "reserves", "mdns"),
    [
        ("worker", {}, ["/ip4/0.0.0.0/tcp/4001"], False, "auto", True),
        ("bootstrap", {}, ["/ip4/0.0.0.0/tcp/4001"], True, "never", True),
        ("gateway", {}, ["/ip4/0.0.0.0/tcp/0"], False, "never", True),
        ("client", {}, ["/ip4/0.0.0.0/tcp/0"], False, "never", True),
        # a network on one machine: loopback from the environment, and no mDNS on it
        ("worker", {"COCOON_LISTEN": "/ip4/127.0.0.1/tcp/0"}, ["/ip4/127.0.0.1/tcp/0"], False, "auto", False),
    ],
)
def test_role_defaults(
    role: str, env: dict[str, str], listen: list[str], relays_for_others: bool, reserves: str, mdns: bool
) -> None:
    cfg = config_mod.role_defaults(config_mod.load(None, {}, env=env), role, env=env)
    assert (cfg.listen, cfg.relay_service, cfg.reserve_relay, cfg.mdns) == (listen, relays_for_others, reserves, mdns)


def test_role_defaults_keep_what_was_said_and_refuse_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "w.toml").write_text('listen = "/ip4/10.0.0.5/tcp/4002"\nrelay_service = true\nmdns = false\n')
    env = {"COCOON_LISTEN": "/ip4/127.0.0.1/tcp/0"}
    cfg = config_mod.role_defaults(config_mod.load(tmp_path / "w.toml", {}, env=env), "worker", env=env)
    assert (cfg.listen, cfg.relay_service, cfg.mdns) == (["/ip4/10.0.0.5/tcp/4002"], True, False)
    for text, key in (
        ('reserve_relay = "sometimes"\n', "reserve_relay"),
        ('wallet_version = "v3"\n', "wallet_version"),
    ):
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ConfigError, match=key):
            config_mod.role_defaults(config_mod.load(tmp_path / "bad.toml", {}, env={}), "worker", env={})
