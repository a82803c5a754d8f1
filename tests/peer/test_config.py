import dataclasses

import pytest

from shoal.optim.inner import InnerConfig
from shoal.optim.outer import OuterConfig
from shoal.peer.cli import build_parser, peer_config_from, settings_of
from shoal.peer.config import PeerConfig, ProtocolConfig, RunConfig
from shoal.peer.errors import ConfigMismatch
from shoal.train import PRESETS


def peer_config(flags: list[str]) -> PeerConfig:
    return peer_config_from(settings_of(build_parser().parse_args(["peer", *flags])))


def run(**kw):
    base = dict(
        model_preset="tiny",
        model=PRESETS["tiny"].to_dict(),
        inner=InnerConfig(),
        outer=OuterConfig(),
        inner_steps=10,
    )
    return RunConfig(**{**base, **kw})


def test_same_config_passes_and_round_trips():
    a = run()
    a.check_same(RunConfig.from_dict(a.to_dict()))


def test_mismatch_names_every_differing_setting():
    with pytest.raises(ConfigMismatch) as err:
        run(
            outer=OuterConfig(codec="fp32"), model={**PRESETS["tiny"].to_dict(), "d_model": 64}
        ).check_same(run())
    assert (
        "outer.codec" in str(err.value)
        and "model.d_model" in str(err.value)
        and "inner.lr" not in str(err.value)
    )


def test_unreadable_config_is_a_mismatch():
    with pytest.raises(ConfigMismatch):
        RunConfig.from_dict({"model_preset": "tiny"})


def test_validation_names_flags():
    with pytest.raises(ValueError, match="--inner-steps"):
        run(inner_steps=0)
    with pytest.raises(ValueError, match="--bootstrap"):
        PeerConfig.of(run(), bootstrap="127.0.0.1:7000")
    with pytest.raises(ValueError, match="--resume"):
        PeerConfig.of(run(), resume=True)
    with pytest.raises(ValueError, match="--outer-lr"):
        OuterConfig(lr=0)


def test_gather_deadline_follows_measured_speed():
    assert ProtocolConfig().gather_deadline_s(3.0) == 10.0
    assert ProtocolConfig().gather_deadline_s(42.0) == 42.0
    assert ProtocolConfig(gather_timeout_s=5.0).gather_deadline_s(42.0) == 5.0


def test_pipeline_settings_are_checked():
    with pytest.raises(ValueError, match="--stages must be 0"):
        run(stages=1)
    with pytest.raises(ValueError, match="--stages needs --outer diloco or sparseloco"):
        run(stages=3, outer=OuterConfig(name="noloco"))
    with pytest.raises(ValueError, match="--role stage needs a pipelined run"):
        PeerConfig.of(run(), role="stage")
    with pytest.raises(ValueError, match="--stage must be in 0..2"):
        PeerConfig.of(run(stages=3), role="stage", stage=3)
    with pytest.raises(ValueError, match="--role must be"):
        PeerConfig.of(run(), role="trainer")
    assert RunConfig.from_dict(run(stages=3).to_dict()).stages == 3
    with pytest.raises(ConfigMismatch, match="stages"):
        run(stages=3).check_same(run())


def test_skip_keep_flag_parses_and_is_checked():
    def parse(*flags: str):
        return peer_config(
            ["--model", "tiny-deep", "--stages", "5", "--role", "stage", *flags]
        ).pipeline

    assert parse().skip_keep == (1,) and parse().skip_swaps == 0  # the defaults
    assert parse("--skip-keep", "1,4").skip_keep == (1, 4)
    assert parse("--skip-keep", "none").skip_keep == ()
    with pytest.raises(SystemExit):
        parse("--skip-keep", "first")
    with pytest.raises(ValueError, match="--skip-keep must list distinct block stages in 1..4"):
        parse("--skip-ratio", "0.33", "--skip-keep", "0")
    with pytest.raises(ValueError, match="--skip-keep"):
        parse("--skip-ratio", "0.33", "--skip-keep", "2,2")
    with pytest.raises(
        ValueError,
        match="--skip-keep keeps 3 stages, but with --skip-ratio 0.33 a path visits only 2 "
        "block stages",
    ):
        parse("--skip-ratio", "0.33", "--skip-keep", "1,2,3")
    assert parse().skip_rescale == "sqrt" and parse("--skip-rescale", "none").skip_rescale == "none"
    with pytest.raises(SystemExit):
        parse("--skip-rescale", "cube")
    with pytest.raises(ValueError, match="--skip-rescale must be one of none, sqrt, inverse"):
        dataclasses.replace(parse(), skip_rescale="cube")
