"""Benchmark the pseudo-gradient codecs against hivemind's: wire size, error, error feedback, speed.

Inputs, each run through every codec:
* `small-delta`: a real pseudo-gradient. `build_model("small", seed=0)` trained H inner
  steps (InnerTrainer with the `small` recipe, shard of "peer-0"); Δ = θ_start − θ_after,
  coded tensor by tensor (sizes and times summed over the model, errors over all of it).
* `randn-N`: a random normal matrix of N elements, shape (N / 1024, 1024).

Per codec and input:
* `bits_per_param`: wire bytes · 8 / elements (our payloads with their header; hivemind's
  `runtime_pb2.Tensor.SerializeToString()`);
* `rel_err`: ‖decode(encode(x)) − x‖ / ‖x‖, one round;
* `rel_err_ef`: error feedback over `--rounds` rounds (e ← e + x_t; send = codec(e);
  e ← e − decoded(send)), ‖Σ decoded − Σ x_t‖ / ‖Σ x_t‖. Random inputs use fresh x_t each
  round; the real Δ uses x_t = a_t·Δ + 0.1·rms(Δ)·ξ_t per tensor, a_t ~ U(0.5, 1.5),
  ξ_t ~ N(0, 1) (a stand-in for successive rounds' pseudo-gradients, which are similar);
* `encode_eps` / `decode_eps`: elements per second, median of at least `--repeats` calls
  and of as many as fit in a second, one torch thread; a model's tensors are encoded the
  way the codec's user does it (topk: one `encode_many` call, as SparseLoCo does, and one
  `decode_many` call, SparseLoCo's `decode_sparse_many` plus the scatter into dense
  tensors; the others, hivemind's included: one call per tensor). hivemind's encode is
  compress + SerializeToString, its decode ParseFromString + extract, so both sides go to
  and from bytes;
* ratios against hivemind's Uniform8BitQuantization on the same input: bytes and
  encode+decode time.

hivemind 1.1.12's Quantization.extract calls int() on a 1-element array, which numpy >= 2.4
refuses; the benchmark substitutes the same code with `[0]` (noted in the JSON).

    python scripts/bench_codecs.py                    # 1M, 4M, 16M + small-delta
    python scripts/bench_codecs.py --big --out results/bench_codecs.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shoal.compression import get_codec
from shoal.optim.inner import InnerConfig, InnerTrainer
from shoal.train import RECIPES, ByteData, build_model, load_corpus

OUR_CODECS = ("fp32", "fp16", "int8", "q4", "topk")
HIVEMIND_CODECS = ("hm-fp16", "hm-uniform8", "hm-quantile8")
BASELINE = "hm-uniform8"


@dataclass
class Coder:
    """A codec as two functions: tensor -> bytes, (bytes, shape) -> float32 tensor; and
    how a whole input (a model's tensors) is encoded and decoded: one call per tensor,
    unless the codec batches them (topk's encode_many and decode_many; SparseLoCo sends
    with encode_many and receives with decode_sparse_many, the same batch less the dense
    scatter)."""

    name: str
    encode: Callable[[torch.Tensor], bytes]
    decode: Callable[[bytes, tuple[int, ...]], torch.Tensor]
    encode_all: Callable[[list[torch.Tensor]], list[bytes]] | None = None
    decode_all: Callable[[list[bytes], list[tuple[int, ...]]], list[torch.Tensor]] | None = None

    def encode_input(self, tensors: list[torch.Tensor]) -> list[bytes]:
        return self.encode_all(tensors) if self.encode_all else [self.encode(t) for t in tensors]

    def decode_input(
        self, payloads: list[bytes], shapes: list[tuple[int, ...]]
    ) -> list[torch.Tensor]:
        if self.decode_all:
            return self.decode_all(payloads, shapes)
        return [
            self.decode(payload, shape) for payload, shape in zip(payloads, shapes, strict=True)
        ]


def our_coder(name: str) -> Coder:
    codec = get_codec(name)
    return Coder(
        name,
        codec.encode,
        codec.decode,
        getattr(codec, "encode_many", None),
        getattr(codec, "decode_many", None),
    )


def _extract_quantized(self, serialized):  # hivemind's Quantization.extract, numpy>=2.4-safe
    codebook_size = int(np.frombuffer(serialized.buffer, count=1, dtype=np.int64)[0])
    codebook = np.frombuffer(
        serialized.buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype
    )
    quantized = np.frombuffer(
        serialized.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype
    )
    quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized.size))
    codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized.dtype))
    return codebook[quantized]


def patch_hivemind_extract() -> None:
    """hivemind 1.1.12's Quantization.extract calls int() on a 1-element array, which numpy
    >= 2.4 refuses; replace it process-wide (same arithmetic) before any hivemind decode."""
    from hivemind.compression.quantization import Quantization

    Quantization.extract = _extract_quantized


def hivemind_coders() -> tuple[list[Coder], str | None]:
    """hivemind's codecs, or ([], why not) if hivemind cannot be imported."""
    try:
        from hivemind.compression import (
            CompressionInfo,
            Float16Compression,
            Quantile8BitQuantization,
            Uniform8BitQuantization,
        )
        from hivemind.proto import runtime_pb2
    except Exception as exc:  # any import failure is reported in the table, not fatal
        return [], f"hivemind not importable: {type(exc).__name__}: {exc}"

    patch_hivemind_extract()

    def wrap(name: str, compression) -> Coder:
        def encode(tensor: torch.Tensor) -> bytes:
            return compression.compress(
                tensor, CompressionInfo.from_tensor(tensor)
            ).SerializeToString()

        def decode(payload: bytes, shape: tuple[int, ...]) -> torch.Tensor:
            message = runtime_pb2.Tensor()
            message.ParseFromString(payload)
            return compression.extract(message).float().reshape(shape)

        return Coder(name, encode, decode)

    coders = [
        wrap("hm-fp16", Float16Compression()),
        wrap("hm-uniform8", Uniform8BitQuantization()),
        wrap("hm-quantile8", Quantile8BitQuantization()),
    ]
    return coders, None


def real_delta(inner_steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Δ = θ_start − θ_after H inner steps of the `small` model (as scripts/tune_small.py)."""
    recipe = RECIPES["small"]
    inner = InnerConfig(
        lr=recipe.inner_lr,
        warmup_steps=recipe.warmup_steps,
        batch_size=recipe.batch_size,
        seq_len=recipe.seq_len,
    )
    data = ByteData(load_corpus(None), num_shards=16)
    model = build_model("small", seed=seed)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = data.train_batches("peer-0", inner.batch_size, inner.seq_len, seed=seed)
    trainer = InnerTrainer(model, inner, batches, torch.device("cpu"))
    trainer.run(inner_steps)
    after = trainer.local_weights()
    return {n: (start[n] - after[n].detach().float()).contiguous() for n in start}


def median_time(fn: Callable[[], object], repeats: int, min_total_s: float = 1.0) -> float:
    """Median over at least `repeats` calls, and over as many as fit in `min_total_s`
    (millisecond-long calls on a shared VM need dozens of samples for a stable median)."""
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_total_s and len(times) < 500):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def measure(
    coder: Coder,
    tensors: dict[str, torch.Tensor],
    rounds_of: Callable[[int], dict[str, torch.Tensor]],
    rounds: int,
    repeats: int,
) -> dict:
    """All metrics of one codec on one input (a dict of tensors coded one by one)."""
    count = sum(t.numel() for t in tensors.values())
    shapes = [tuple(t.shape) for t in tensors.values()]
    payloads = coder.encode_input(list(tensors.values()))
    wire_bytes = sum(len(p) for p in payloads)
    decoded = coder.decode_input(payloads, shapes)
    err2 = sum(
        float((d - t).double().square().sum())
        for d, t in zip(decoded, tensors.values(), strict=True)
    )
    norm2 = sum(float(t.double().square().sum()) for t in tensors.values())
    encode_s = median_time(lambda: coder.encode_input(list(tensors.values())), repeats)
    decode_s = median_time(lambda: coder.decode_input(payloads, shapes), repeats)

    # error feedback: Σ sent = Σ x_t − e_final, so the error of the sum is ‖e_final‖ / ‖Σ x_t‖
    error = {n: torch.zeros_like(t) for n, t in tensors.items()}
    total = {n: torch.zeros_like(t) for n, t in tensors.items()}
    for round_id in range(rounds):
        for n, x in rounds_of(round_id).items():
            error[n] += x
            total[n] += x
        sent = coder.encode_input(list(error.values()))
        for e, d in zip(error.values(), coder.decode_input(sent, shapes), strict=True):
            e -= d
    ef_err2 = sum(float(e.double().square().sum()) for e in error.values())
    ef_norm2 = sum(float(t.double().square().sum()) for t in total.values())
    return {
        "codec": coder.name,
        "elements": count,
        "wire_bytes": wire_bytes,
        "bits_per_param": 8 * wire_bytes / count,
        "rel_err": (err2 / norm2) ** 0.5,
        "rel_err_ef": (ef_err2 / ef_norm2) ** 0.5,
        "encode_s": encode_s,
        "decode_s": decode_s,
        "encode_eps": count / encode_s,
        "decode_eps": count / decode_s,
    }


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="results/bench_codecs.json")
    parser.add_argument("--sizes", default="1M,4M,16M", help="random tensor sizes (K/M suffixes)")
    parser.add_argument("--big", action="store_true", help="also a 64M-element tensor")
    parser.add_argument("--no-real", action="store_true", help="skip the trained small-model Δ")
    parser.add_argument("--inner-steps", type=int, default=50, help="H for the real Δ")
    parser.add_argument("--rounds", type=int, default=20, help="error-feedback rounds")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    parser.add_argument("--codecs", default=",".join(OUR_CODECS), help="our codecs to run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    coders = [our_coder(name) for name in args.codecs.split(",")]
    hm_coders, hm_missing = hivemind_coders()
    coders += hm_coders

    inputs: list[tuple[str, dict[str, torch.Tensor], Callable[[int], dict[str, torch.Tensor]]]] = []
    if not args.no_real:
        begin = time.perf_counter()
        delta = real_delta(args.inner_steps, args.seed)
        print(
            f"small-delta: {sum(t.numel() for t in delta.values()):,} params, "
            f"H={args.inner_steps}, "
            f"{time.perf_counter() - begin:.0f} s"
        )

        def delta_round(
            round_id: int, delta: dict[str, torch.Tensor] = delta
        ) -> dict[str, torch.Tensor]:
            gen = torch.Generator().manual_seed(10_000 + round_id)
            scale = 0.5 + torch.rand((), generator=gen).item()
            return {
                n: scale * t + 0.1 * t.square().mean().sqrt() * torch.randn(t.shape, generator=gen)
                for n, t in delta.items()
            }

        inputs.append(("small-delta", delta, delta_round))
    sizes = [parse_size(s) for s in args.sizes.split(",") if s] + ([64 << 20] if args.big else [])
    for size in sizes:
        shape = (size // 1024, 1024) if size % 1024 == 0 else (size,)

        def random_round(round_id: int, shape: tuple[int, ...] = shape) -> dict[str, torch.Tensor]:
            return {
                "x": torch.randn(
                    shape, generator=torch.Generator().manual_seed(args.seed + 1 + round_id)
                )
            }

        inputs.append(
            (
                f"randn-{size >> 20}M" if size >= 1 << 20 else f"randn-{size}",
                random_round(-1),
                random_round,
            )
        )

    rows = []
    for input_name, tensors, rounds_of in inputs:
        by_codec = {}
        for coder in coders:
            row = measure(coder, tensors, rounds_of, args.rounds, args.repeats)
            row["input"] = input_name
            by_codec[coder.name] = row
            rows.append(row)
        if hm_missing:
            for name in HIVEMIND_CODECS:
                rows.append({"input": input_name, "codec": name, "unavailable": hm_missing})
        base = by_codec.get(BASELINE)
        for row in by_codec.values():
            row["bytes_vs_hm_uniform8"] = row["wire_bytes"] / base["wire_bytes"] if base else None
            row["time_vs_hm_uniform8"] = (
                (row["encode_s"] + row["decode_s"]) / (base["encode_s"] + base["decode_s"])
                if base
                else None
            )

    def ratio(value: float | None) -> str:
        return f"{value:8.3f}" if value is not None else f"{'-':>8}"

    header = (
        f"{'input':<12} {'codec':<13} {'bits/param':>10} {'rel_err':>8} {'rel_err_ef':>10} "
        f"{'enc Me/s':>9} {'dec Me/s':>9} {'bytes/u8':>8} {'time/u8':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if "unavailable" in row:
            print(f"{row['input']:<12} {row['codec']:<13} unavailable: {row['unavailable']}")
            continue
        print(
            f"{row['input']:<12} {row['codec']:<13} "
            f"{row['bits_per_param']:10.4f} {row['rel_err']:8.4f} {row['rel_err_ef']:10.4f} "
            f"{row['encode_eps'] / 1e6:9.1f} {row['decode_eps'] / 1e6:9.1f} "
            f"{ratio(row['bytes_vs_hm_uniform8'])} {ratio(row['time_vs_hm_uniform8'])}"
        )

    result = {
        "command": "python scripts/bench_codecs.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if v not in (False, None)
        ),
        "torch_threads": 1,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.processor() or platform.machine(),
        "real_delta_rounds": (
            "x_t = a_t*Δ + 0.1*rms(Δ)*ξ_t per tensor, a_t ~ U(0.5, 1.5), ξ_t ~ N(0, 1)"
        ),
        "random_rounds": "fresh x_t ~ N(0, 1) each round",
        "random_shape": "(N / 1024, 1024)",
        "hivemind": hm_missing
        or "available; Quantization.extract patched for numpy >= 2.4 (int(arr[0]))",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
