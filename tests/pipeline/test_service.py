"""The stage side refuses malformed hops with a clear error and without changing state."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from shoal.compression import CodecError
from shoal.optim.inner import InnerConfig
from shoal.pipeline.compression import parse_activation
from shoal.pipeline.protocol import Microbatch, StageRequestError
from shoal.pipeline.service import StageService
from shoal.pipeline.stages import StagePlan, build_stage
from shoal.pipeline.worker import BlockWorker, UnknownMicrobatch
from shoal.train import PRESETS

CONFIG = PRESETS["tiny"]


def service(activation: str = "none") -> StageService:
    setting = parse_activation(activation, CONFIG, 0)
    worker = BlockWorker(
        build_stage(CONFIG, StagePlan(3, CONFIG.n_layers), 1, 0),
        InnerConfig(),
        torch.device("cpu"),
        setting.basis,
    )
    return StageService(
        worker, 1, setting, CONFIG, ThreadPoolExecutor(1), lambda: 0, round_wait_s=0.2
    )


def forward_request(svc: StageService, **overrides):
    tokens = torch.randint(0, 256, (2, 8))
    h = torch.randn(2, 8, CONFIG.d_model)
    base = {
        **Microbatch("mb-1", tokens).to_wire(),
        "stage": 1,
        "round": 0,
        "codec": svc.setting.name,
        "act": svc.setting.codec.encode(h, tokens),
    }
    return {**base, **overrides}


@pytest.mark.parametrize(
    "damage, error",
    [
        ({"stage": 2}, "serves stage 1"),
        ({"codec": "int8"}, "serves activation codec"),
        ({"shape": [2, 9]}, "tokens hold"),
        ({"shape": [2, 10_000]}, "exceeds the limits"),
        ({"shape": "2x8"}, "shape must be"),
        ({"tokens": b"\xff" * 64}, "token ids outside"),  # int32 ids of 2**32-1
        ({"key": ""}, "key must be"),
        ({"round": -1}, "round must be"),
        ({"round": 5}, "outer round"),  # the stage is at round 0: waits, then refuses
        ({"act": b"garbage"}, "payload"),
        ({"scale": 0.0}, "scale must be"),
        ({"scale": 17.0}, "scale must be"),
        ({"scale": float("nan")}, "scale must be"),
        ({"scale": "2"}, "scale must be"),
        ({"scale": True}, "scale must be"),
    ],
)
def test_malformed_forward_is_refused_and_keeps_nothing(damage, error):
    svc = service()
    with pytest.raises((StageRequestError, CodecError), match=error):
        asyncio.run(svc.forward(forward_request(svc, **damage)))
    assert svc.worker.in_flight == 0 and svc.tokens == 0


def test_backward_for_an_unknown_microbatch_and_a_good_round_trip():
    svc = service()
    request = forward_request(svc)
    tokens = Microbatch.from_wire(request, 256, 64).tokens
    grad = {
        **{k: request[k] for k in ("key", "tokens", "shape", "stage", "codec")},
        "grad": svc.setting.codec.encode_grad(torch.randn(2, 8, CONFIG.d_model), tokens),
    }
    with pytest.raises(UnknownMicrobatch):
        asyncio.run(svc.backward(grad))
    answer = asyncio.run(svc.forward(request))
    assert svc.setting.codec.decode(answer["act"], tokens, CONFIG.d_model).shape == (
        2,
        8,
        CONFIG.d_model,
    )
    assert svc.worker.in_flight == 1
    asyncio.run(svc.backward(grad))
    assert svc.worker.in_flight == 0 and svc.worker.microbatches == 1
    with pytest.raises(UnknownMicrobatch):  # a second backward of the same microbatch
        asyncio.run(svc.backward(grad))


def test_non_finite_activations_are_refused():
    svc = service("int8")
    tokens = torch.randint(0, 256, (2, 8))
    bad = torch.full((2, 8, CONFIG.d_model), float("nan"))
    with pytest.raises(CodecError):
        svc.setting.codec.encode(bad, tokens)
    payload = bytearray(forward_request(svc)["act"])
    payload[-5:] = b"\xff\xff\xff\xff\xff"  # corrupt the body: CRC mismatch
    with pytest.raises(CodecError):
        asyncio.run(svc.forward(forward_request(svc, act=bytes(payload))))
    assert svc.worker.in_flight == 0


def test_step_message_is_checked():
    svc = service()
    with pytest.raises(StageRequestError, match="train_loss"):
        asyncio.run(
            svc.step(
                {"stage": 1, "step": 0, "round": 0, "round_step": 1, "train_loss": float("nan")}
            )
        )
    assert asyncio.run(
        svc.step({"stage": 1, "step": 0, "round": 0, "round_step": 1, "train_loss": 2.0})
    ) == {"stepped": False, "step": 0}


def test_step_messages_tell_where_the_round_is_even_after_missed_ones():
    svc = service()
    stopping = threading.Event()
    step = {"stage": 1, "step": 7, "round": 2, "train_loss": 2.5}
    with pytest.raises(StageRequestError, match="round_step"):
        asyncio.run(svc.step(step))
    asyncio.run(
        svc.step({**step, "round_step": 3})
    )  # joined late: steps 1 and 2 of round 2 were never seen
    assert svc.wait_steps(2, 3, stopping) == 3 and svc.last_loss == 2.5
    asyncio.run(svc.step({**step, "round_step": 4}))
    assert svc.wait_steps(2, 4, stopping) == 4


def test_a_residual_scale_scales_the_training_forward_and_is_refused_on_infer():
    svc = service()
    request = forward_request(svc, scale=2.0)
    tokens = Microbatch.from_wire(request, 256, 64).tokens
    h = svc.setting.codec.decode(request["act"], tokens, CONFIG.d_model)
    with torch.no_grad():
        expected = h + 2.0 * (svc.worker.module(h) - h)
    answer = asyncio.run(svc.forward(request))
    assert torch.allclose(
        svc.setting.codec.decode(answer["act"], tokens, CONFIG.d_model), expected, atol=1e-5
    )
    with pytest.raises(StageRequestError, match="no residual scale"):
        asyncio.run(svc.infer(forward_request(svc, key="mb-2", scale=2.0)))
    assert svc.worker.in_flight == 1  # the training forward's input, nothing of the refused one
