"""What each piece of a round's byte and tensor work costs the event loop, one at a time.

    python scripts/bench_loop_holders.py --model large --out results/bench_loop_holders_large.json

One process, one event loop with a lag monitor (a 10 ms sleep, measuring how late it wakes),
and one executor thread that runs, one after another, the work a `large` peer does with its
own contribution and the others': encode it (int8 DiLoCo), decode it, prepare its answer
body (`WireCodec.prepare`), open a received body (`WireCodec.decode`), the outer step, a
snapshot of the outer state, the weights hash, and serializing the state for a joiner.
Work in an executor still stalls the loop when a C call holds the interpreter throughout;
this names which. `--baseline` also times the way the first cut of the redesign did it
(one `msgpack.packb` + `zstd_frame`, one `msgpack.unpackb`, `safetensors.torch.save`),
side by side. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgpack
import torch


def build(model: str) -> dict[str, Any]:
    from shoal.optim.registry import build_outer, outer_config
    from shoal.peer.wire import WireCodec
    from shoal.train import build_model

    weights = {n: p.detach().clone() for n, p in build_model(model, seed=0).named_parameters()}
    outer = build_outer(weights, outer_config("diloco"))
    local = {n: t + 1e-3 * torch.randn_like(t) for n, t in weights.items()}
    wire = WireCodec("a", "s", "key", max_body_bytes=2**31)
    return {"outer": outer, "local": local, "wire": wire}


def jobs(state: dict[str, Any], baseline: bool) -> list[tuple[str, Any]]:
    from shoal.compression import zstd_frame
    from shoal.optim.outer import weights_hash
    from shoal.peer.publisher import take_snapshot
    from shoal.peer.statesync import serialize_state

    outer, wire = state["outer"], state["wire"]

    def encode() -> None:
        state["payload"] = outer.contribution(state["local"])

    def decode() -> None:
        state["own"] = outer.decode_contribution(state["payload"])

    def prepare() -> None:
        state["body"] = wire.prepare({"round": 0, "peer": "a", "tensors": state["payload"]})

    def open_body() -> None:
        body = state["body"]
        chunks = [body.data[i : i + 2**20] for i in range(0, len(body.data), 2**20)]
        wire.decode(
            "RESPONSE", "p", wire.headers("RESPONSE", "p", body), b"".join(chunks), max_bytes=2**31
        )

    def apply() -> None:
        outer.apply([state["own"], state["own"]])

    def serialize() -> None:
        serialize_state(1, dict(outer.state_tensors()), {}, 4 * 2**20)

    def packb_and_frame() -> None:  # the first cut's prepare
        raw = msgpack.packb(
            {"round": 0, "peer": "a", "tensors": state["payload"]}, use_bin_type=True
        )
        state["raw"] = raw
        zstd_frame(raw, min_size=65536)

    def unpackb() -> None:  # the first cut's open (after decompression)
        msgpack.unpackb(state["raw"], raw=False, strict_map_key=True)

    def safetensors_save() -> None:  # the first cut's state blob
        from safetensors.torch import save

        save({n: t.contiguous() for n, t in outer.state_tensors().items()})

    listed = [
        ("encode contribution", encode),
        ("decode contribution", decode),
        ("prepare answer body", prepare),
        ("open received body", open_body),
        ("outer step", apply),
        ("snapshot", lambda: take_snapshot(outer, 1)),
        ("weights hash", lambda: weights_hash(outer.params)),
        ("serialize state", serialize),
    ]
    if baseline:
        listed += [
            ("baseline: packb + zstd_frame", packb_and_frame),
            ("baseline: unpackb", unpackb),
            ("baseline: safetensors save", safetensors_save),
        ]
    return listed


async def measure(listed: list[tuple[str, Any]], tick_s: float) -> list[dict[str, Any]]:
    lags: list[float] = []

    async def monitor() -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + tick_s
            await asyncio.sleep(tick_s)
            lags.append(max(0.0, loop.time() - expected))

    task = asyncio.create_task(monitor())
    await asyncio.sleep(0.2)
    rows = []
    for name, fn in listed:
        lags.clear()
        begin = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, fn)
        seconds = time.perf_counter() - begin
        await asyncio.sleep(3 * tick_s)
        rows.append(
            {
                "work": name,
                "seconds": round(seconds, 4),
                "max_loop_lag_ms": round(1000 * max(lags), 1),
            }
        )
        print(
            f"{name:30s} {1000 * seconds:8.0f} ms   max loop lag {1000 * max(lags):7.1f} ms",
            flush=True,
        )
    task.cancel()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="large", help="model preset (default: large)")
    parser.add_argument("--baseline", action="store_true", help="also time the first cut's way")
    parser.add_argument("--tick", type=float, default=0.01, help="the monitor's sleep in seconds")
    parser.add_argument(
        "--out", help="JSON path (default: results/bench_loop_holders_<model>.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = build(args.model)
    rows = asyncio.run(measure(jobs(state, args.baseline), args.tick))
    out = Path(args.out or f"results/bench_loop_holders_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    params = sum(t.numel() for t in state["outer"].params.values())
    out.write_text(
        json.dumps(
            {"model": args.model, "params": params, "tick_s": args.tick, "rows": rows}, indent=1
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
