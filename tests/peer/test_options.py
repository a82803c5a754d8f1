"""Flags declared once: the command line and `--config` TOML come from the config fields."""

import dataclasses
import logging

import pytest

from shoal.peer.cli import PEER_GROUPS, build_parser, peer_config_from, run_config_from, settings_of
from shoal.peer.config import NetworkConfig, PeerConfig, ProtocolConfig
from shoal.peer.options import flag_fields, flag_name, key_name


def settings(argv, command="peer"):
    return settings_of(build_parser().parse_args([command, *argv]))


def config(argv) -> PeerConfig:
    return peer_config_from(settings(argv))


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_fields_defaults():
    cfg = config([])
    assert cfg.network.listen == "127.0.0.1:7000" and cfg.pipeline.role == "replica"
    assert cfg.protocol == ProtocolConfig() and cfg.run.model_preset == "small"
    assert cfg.run.inner_steps == 50  # the preset's recipe


def test_a_toml_file_at_top_level_and_in_sections(tmp_path):
    path = write(
        tmp_path,
        'model = "tiny"\ninner_steps = 5\n[protocol]\nheartbeat_interval = 0.5\n'
        "dead_after = 4\n[pipeline]\nskip_keep = [1, 3]\n",
    )
    cfg = config(["--config", path])
    assert cfg.run.model_preset == "tiny" and cfg.run.inner_steps == 5
    assert cfg.protocol.heartbeat_interval_s == 0.5 and cfg.protocol.dead_after_s == 4.0
    assert cfg.pipeline.skip_keep == (1, 3)


def test_flags_given_override_the_file_and_defaults_do_not(tmp_path):
    path = write(tmp_path, 'model = "tiny"\nrounds = 7\n[protocol]\nrequest_timeout = 9\n')
    cfg = config(["--config", path, "--rounds", "2"])
    assert cfg.schedule.max_rounds == 2  # the flag wins
    assert (
        cfg.run.model_preset == "tiny" and cfg.protocol.request_timeout_s == 9.0
    )  # untouched by defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('modle = "tiny"\n', "unknown setting 'modle'"),
        (
            '[protocol]\nmodel = "tiny"\n',
            r"\[protocol\] has no setting 'model' \(it belongs in \[run\]\)",
        ),
        ("[nonsense]\nx = 1\n", r"unknown table \[nonsense\]"),
        ('rounds = "three"\n', "rounds"),
        ("heartbeat_interval = true\n", "heartbeat_interval must be float"),
        ('outer = "adam"\n', "outer must be one of"),
        ("model = \n", "not valid TOML"),
    ],
)
def test_bad_files_are_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        settings(["--config", write(tmp_path, text)])


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--config"):
        settings(["--config", str(tmp_path / "absent.toml")])


def test_every_protocol_field_is_reachable_from_a_flag_and_from_toml(tmp_path):
    for f in dataclasses.fields(ProtocolConfig):
        integer = f.type in ("int", "int | None")
        value = (
            2 * f.default if f.default is not None else (123 if integer else 2.5)
        )  # keeps their order
        from_flag = config([flag_name(f), str(value)]).protocol
        from_file = config(
            ["--config", write(tmp_path, f"[protocol]\n{key_name(f)} = {value}\n")]
        ).protocol
        assert getattr(from_flag, f.name) == value == getattr(from_file, f.name), f.name


def test_every_section_field_has_a_flag_and_help():
    flags = set()
    for section in PEER_GROUPS.values():
        for f in flag_fields(section):
            assert f.metadata["help"], f.name
            flags.add(flag_name(f))
    text = (
        build_parser().format_help()
        + build_parser()._subparsers._group_actions[0].choices["peer"].format_help()
    )
    assert all(flag in text for flag in flags)
    assert {
        "--data",
        "--rounds",
        "--threads",
        "--listen",
        "--gather-timeout",
        "--partner-timeout",
    } <= flags


def test_validation_names_the_flag():
    with pytest.raises(ValueError, match="--request-timeout must be positive"):
        ProtocolConfig(request_timeout_s=0)
    with pytest.raises(ValueError, match="--compute-nice"):
        config(["--compute-nice", "40"])
    with pytest.raises(ValueError, match="--listen"):
        NetworkConfig(listen="nowhere")


def test_peer_config_of_places_flat_keywords_in_sections():
    run = run_config_from({"model": "tiny"})
    cfg = PeerConfig.of(
        run,
        peer_id="a",
        role="replica",
        max_rounds=3,
        data_path="/x",
        linger_s=2.0,
        heartbeat_interval_s=0.5,
    )
    assert (
        cfg.network.listen == "127.0.0.1:0" and cfg.peer_id == "a" and cfg.schedule.max_rounds == 3
    )
    assert (
        cfg.data.path == "/x"
        and cfg.protocol.linger_s == 2.0
        and cfg.protocol.heartbeat_interval_s == 0.5
    )
    with pytest.raises(TypeError, match="no config section has a setting 'colour'"):
        PeerConfig.of(run, colour="blue")


def test_advertising_loopback_to_a_remote_swarm_warns():
    remote = NetworkConfig(bootstrap="http://203.0.113.5:7000")
    assert "--advertise" in remote.loopback_warning()
    assert (
        NetworkConfig(
            bootstrap="http://203.0.113.5:7000", advertise="http://198.51.100.7:7000"
        ).loopback_warning()
        is None
    )
    assert NetworkConfig(bootstrap="http://127.0.0.1:7000").loopback_warning() is None
    assert NetworkConfig().loopback_warning() is None
    # client mode on purpose: nothing to warn about (peer.tunnel)
    assert NetworkConfig(bootstrap=remote.bootstrap, reachable="no").loopback_warning() is None
    for listen in ("localhost:7000", "[::1]:7000", "127.0.1.1:7000"):
        assert (
            "--advertise"
            in NetworkConfig(listen=listen, bootstrap=remote.bootstrap).loopback_warning()
        )
    # listening on every interface without --advertise advertises 0.0.0.0: no one can dial it
    wildcard = NetworkConfig(listen="0.0.0.0:7000", bootstrap="http://peer.example.org:7000")
    assert "unspecified address 0.0.0.0" in wildcard.loopback_warning()


def test_the_peer_logs_that_warning_at_start(caplog, monkeypatch):
    import asyncio

    from shoal.peer import cli

    class Refused(Exception):
        pass

    def refuse(config):  # stop right after the warning, before anything starts
        raise Refused

    monkeypatch.setattr("shoal.peer.node.Peer", refuse)
    cfg = config(["--bootstrap", "http://203.0.113.5:7000", "--model", "tiny"])
    with caplog.at_level(logging.WARNING), pytest.raises(Refused):
        asyncio.run(cli.run_peer(cfg))
    assert "loopback address 127.0.0.1" in caplog.text and "--advertise" in caplog.text


def test_demo_settings_reach_its_peers_through_one_file():
    from shoal.peer.demo import peer_settings_toml

    values = settings(
        [
            "--model",
            "tiny",
            "--stages",
            "2",
            "--inner-steps",
            "5",
            "--heartbeat-interval",
            "0.5",
            "--peers",
            "2",
        ],
        command="demo",
    )
    text = peer_settings_toml(values)
    assert 'model = "tiny"' in text and "stages = 2" in text and "inner_steps = 5" in text
    assert "heartbeat_interval = 0.5" in text and "peers" not in text


def test_a_flag_can_undo_a_files_switch(tmp_path):
    path = write(tmp_path, 'resume = true\ncheckpoint_dir = "ckpt"\n')
    assert config(["--config", path]).schedule.resume
    assert not config(["--config", path, "--no-resume"]).schedule.resume
    assert config(["--checkpoint-dir", "ckpt", "--resume"]).schedule.resume  # as before


def test_every_protocol_limit_is_validated_naming_its_flag():
    for f in dataclasses.fields(ProtocolConfig):
        with pytest.raises(ValueError, match=f"{flag_name(f)} must be positive"):
            ProtocolConfig(**{f.name: 0})
    with pytest.raises(ValueError, match="--forget-after must be at least --dead-after"):
        ProtocolConfig(forget_after_s=5.0)
    with pytest.raises(ValueError, match="--router-max-ban must be at least --router-ban"):
        ProtocolConfig(router_ban_s=30.0, router_max_ban_s=20.0)


def test_help_names_the_unit_a_flag_lost():
    text = build_parser()._subparsers._group_actions[0].choices["peer"].format_help()
    assert "--request-timeout SECONDS" in text and "--max-request-bytes BYTES" in text
    assert "--no-standby" in text and "usage: shoal peer [--config FILE]" in text
