"""Sparse codecs and many peers: gather whole contributions, or partition by chunk ranges?

    python scripts/bench_sparse_partition.py --peers 4 8 16 32 64 --sizes tiny 10M \
        --out results/bench_sparse_partition.json

In process, no sockets; the codec (`topk`), SparseLoCo's error feedback and its aggregate
are the real ones, and every byte count is a real encoded length (accounting in
`sparse_partition_wire.py`). Per swarm size N and model size it reports the bytes one peer
downloads in a round:
* gather (today): the other N−1 contributions;
* partition, exact: owner j receives the other participants' pieces of its chunk range and
  publishes their exact SparseLoCo aggregate (median-norm clip, mean over senders), in
  float32 (exact) or bfloat16 (lossy); every peer fetches the other owners' shards;
* partition, re-sparsified: the owner re-encodes its aggregate with `topk` (k per chunk,
  2 bits): constant bytes, but a different algorithm; its distance to the exact aggregate
  is reported (relative L2 error).
Plus the envelope per message (shoal's signed headers and msgpack framing, measured with
`WireCodec`) times the messages per peer (gather N−1, partition 2·(N−1)).

Contributions. `tiny`: 64 real replicas trained from one seed, each on its own data shard
(AdamW at the tiny recipe, --inner-steps per round) for --rounds rounds, SparseLoCo applied
every round; the last round's contributions are measured, the first N for a swarm of N.
Larger sizes: training 64 replicas of 10M does not fit the CPU budget, so pseudo-gradients
are synthetic, Δ_j = √ρ·g + √(1−ρ)·ε_j (g shared,
ε_j per replica, Gaussian, fresh each round) fed through the real error feedback for
--synthetic-rounds rounds, at each --rho: the pairwise cosine of the Δ_j, which sets how much
the replicas' top-k selections overlap and so decides the comparison. Default: 0, 0.5 and
the mean cosine measured between the tiny replicas (whose union density the synthetic Δ_j
reproduce at tiny's shapes: `union_density_real_vs_synthetic_tiny`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse_partition_wire as wire  # noqa: E402 - a sibling file, not a package

from shoal.compression import TopKCodec  # noqa: E402
from shoal.optim.outer import OuterConfig  # noqa: E402
from shoal.optim.sparseloco import SparseLoCo, send_with_error_feedback  # noqa: E402
from shoal.peer.wire import WireCodec  # noqa: E402
from shoal.train.data import ByteData, load_corpus  # noqa: E402
from shoal.train.model import PRESETS, ModelConfig, build_model  # noqa: E402

SIZES = {  # name -> model config (10M: ~10.7M parameters, byte vocabulary)
    "tiny": PRESETS["tiny"],
    "10M": ModelConfig(d_model=384, n_layers=6, n_heads=6, d_ff=1024, max_seq_len=128),
}
TINY_RECIPE = {"lr": 3e-3, "batch_size": 8, "seq_len": 64}  # train/recipe.py's tiny


def _peer_id(index: int) -> str:
    return f"peer-{index:08x}"  # the shape of config.py's ids ("peer-" + 4 hex bytes)


def train_tiny(peers: int, rounds: int, inner_steps: int, seed: int) -> tuple[list, list]:
    """(the last round's contribution payloads, its Δ_j flattened) of `peers` replicas."""
    model = build_model("tiny", seed)
    outer = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = OuterConfig(name="sparseloco", codec="topk", lr=1.0)
    data = ByteData(load_corpus(None), num_shards=peers)
    replicas = []
    for j in range(peers):
        local = build_model("tiny", seed)
        replicas.append(
            {
                "model": local,
                "inner": torch.optim.AdamW(local.parameters(), lr=TINY_RECIPE["lr"]),
                "outer": SparseLoCo(outer, config),
                "batches": data.train_batches(
                    _peer_id(j), TINY_RECIPE["batch_size"], TINY_RECIPE["seq_len"], seed
                ),
            }
        )
    for _ in range(rounds):
        payloads, deltas = [], []
        for replica in replicas:
            model, outer_opt = replica["model"], replica["outer"]
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(outer_opt.params[name])
            for _ in range(inner_steps):
                x, y = next(replica["batches"])
                _, loss = model(x, y)
                replica["inner"].zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                replica["inner"].step()
            local = {n: p.detach().clone() for n, p in model.named_parameters()}
            deltas.append(torch.cat([(outer_opt.params[n] - local[n]).flatten() for n in local]))
            payloads.append(outer_opt.contribution(local))
        decoded = [replicas[0]["outer"].decode_contribution(p) for p in payloads]
        for replica in replicas:
            replica["outer"].apply(decoded)
    return payloads, deltas


def mean_cosine(deltas: list) -> float:
    """Mean pairwise cosine similarity of the replicas' pseudo-gradients."""
    return statistics.mean(
        float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        for a, b in itertools.combinations(deltas, 2)
    )


def synthetic(
    shapes: dict[str, tuple[int, ...]], peers: int, rounds: int, rho: float, seed: int
) -> list[dict[str, bytes]]:
    """The last of `rounds` SparseLoCo contributions of `peers` replicas whose Δ_j have
    pairwise cosine ≈ ρ (see module doc). Replicas are exchangeable, so the first N of a
    64-replica swarm are a swarm of N."""
    codec = TopKCodec()
    generator = torch.Generator().manual_seed(seed)
    errors = [{n: torch.zeros(s) for n, s in shapes.items()} for _ in range(peers)]
    zeros = {n: torch.zeros(s) for n, s in shapes.items()}
    payloads: list[dict[str, bytes]] = []
    for _ in range(rounds):
        shared = {n: torch.randn(s, generator=generator) * rho**0.5 for n, s in shapes.items()}
        payloads = []
        for error in errors:
            delta = {
                n: shared[n] + torch.randn(s, generator=generator) * (1 - rho) ** 0.5
                for n, s in shapes.items()
            }
            payloads.append(send_with_error_feedback(codec, error, delta, zeros, 0.95))
    return payloads


def envelope_nbytes(peers: int) -> dict[str, int]:
    """Per answer a peer downloads: its signed envelope headers plus the msgpack framing
    around the codec bytes (HTTP's own status line and headers not counted)."""
    codec = WireCodec(_peer_id(0), "0123456789abcdef", "swarm-secret", max_body_bytes=1 << 30)
    members = [_peer_id(j) for j in range(peers)]
    answers = {
        "/round/contribution": {
            "round": 1234,
            "peer": members[1],
            "tensors": {f"blocks.{i}.mlp.down.weight": b"\0" * 100 for i in range(12)},
        },
        "/round/shard": {"round": 1234, "peer": members[1], "k": peers, "index": 3, "data": b"\0"},
        "/round/reduced": {
            "round": 1234,
            "tag": "0123456789abcdef",
            "index": 3,
            "missing": [],  # the members whose shard is not in it (peer.reduce)
            "data": b"\0",
        },
    }
    out = {}
    for path, answer in answers.items():
        payload_nbytes = sum(len(v) for v in answer.get("tensors", {}).values()) or 1
        body = codec.prepare(answer)
        headers = codec.headers("POST", f"response 200:{path}", body, nonce="0" * 32)
        header_nbytes = sum(len(k) + len(v) + 4 for k, v in headers.items())
        out[path] = header_nbytes + len(body.data) - payload_nbytes
    return out


def _decoded_vectors(grid: wire.ChunkGrid, codec: TopKCodec, payloads: list) -> list:
    vectors = []
    for payload in payloads:
        pairs = codec.decode_sparse_many(list(payload.values()), grid.shapes)
        vectors.append(
            wire.contribution_vector(grid, codec, [(f.numpy(), v.numpy()) for f, v in pairs])
        )
    return vectors


def _relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), 1e-30))


def resparsify_errors(
    grid: wire.ChunkGrid, codec: TopKCodec, aggregate: wire.SparseVector
) -> dict[str, float]:
    """How far re-sparsifying the exact aggregate moves it: top-k per chunk with exact
    values, and the full `topk` codec (top-k and 2-bit values), relative L2 error."""
    coord_of_flat = np.concatenate(
        [
            wire.to_coords(grid, codec, t, np.arange(int(np.prod(shape)), dtype=np.int64))
            for t, shape in enumerate(grid.shapes)
        ]
    )
    exact_coords = aggregate.dense(grid.numel)
    exact_flat = exact_coords[coord_of_flat]
    counts = [int(np.prod(s)) for s in grid.shapes]
    tensors = [
        torch.from_numpy(part).reshape(shape)
        for part, shape in zip(
            np.split(exact_flat, np.cumsum(counts)[:-1]), grid.shapes, strict=True
        )
    ]
    selected = np.zeros_like(exact_flat)
    offset = 0
    for tensor, count in zip(tensors, counts, strict=True):
        flat, values = codec.topk_select(tensor)
        selected[offset + flat.numpy()] = values.numpy()
        offset += count
    decoded = codec.decode_many(codec.encode_many(tensors), grid.shapes)
    coded = torch.cat([t.reshape(-1) for t in decoded]).numpy()
    return {
        "topk_exact_values": _relative_error(selected, exact_flat),
        "topk_2bit": _relative_error(coded, exact_flat),
    }


def measure(
    grid: wire.ChunkGrid, codec: TopKCodec, payloads: list, envelope: dict[str, int]
) -> dict:
    """Every number of one (model size, N) cell; see the module doc."""
    peers = len(payloads)
    contribution_nbytes = [sum(len(b) for b in p.values()) for p in payloads]
    vectors = _decoded_vectors(grid, codec, payloads)
    aggregate = wire.exact_aggregate(vectors)
    ranges = wire.owner_ranges(grid, peers)
    pieces = [wire.piece_nbytes(grid, codec, lo, hi) for lo, hi in ranges]
    shards = {
        value_bytes: [wire.encode_shard(grid, lo, hi, aggregate, value_bytes) for lo, hi in ranges]
        for value_bytes in (4, 2)
    }
    bf16 = np.zeros(grid.numel, dtype=np.float32)
    for data in shards[2]:
        part = wire.decode_shard(grid, data)
        bf16[part.coords] = part.values
    gather_env = (peers - 1) * envelope["/round/contribution"]
    partition_env = (peers - 1) * (envelope["/round/shard"] + envelope["/round/reduced"])
    variants = {
        "gather": (
            wire.per_peer_download(contribution_nbytes, pieces, pieces)["gather"],
            gather_env,
        ),
        "partition_fp32": (
            wire.per_peer_download(contribution_nbytes, pieces, [len(s) for s in shards[4]])[
                "partition"
            ],
            partition_env,
        ),
        "partition_bf16": (
            wire.per_peer_download(contribution_nbytes, pieces, [len(s) for s in shards[2]])[
                "partition"
            ],
            partition_env,
        ),
        "partition_resparsified": (
            wire.per_peer_download(contribution_nbytes, pieces, pieces)["partition"],
            partition_env,
        ),
    }
    entries = sum(v.coords.size for v in vectors)
    return {
        "peers": peers,
        "contribution_bytes_mean": statistics.mean(contribution_nbytes),
        "union_entries": int(aggregate.coords.size),
        "union_density": aggregate.coords.size / grid.numel,
        "senders_per_union_entry": entries / max(aggregate.coords.size, 1),
        "aggregate_fp32_bytes": sum(len(s) for s in shards[4]),
        "aggregate_bf16_bytes": sum(len(s) for s in shards[2]),
        "envelope_bytes_per_peer": {"gather": gather_env, "partition": partition_env},
        "download_bytes_per_peer": {
            name: {
                "mean": statistics.mean(per_peer) + env,
                "max": max(per_peer) + env,
                "codec_bytes_mean": statistics.mean(per_peer),
            }
            for name, (per_peer, env) in variants.items()
        },
        "relative_error": {
            "partition_bf16": _relative_error(bf16, aggregate.dense(grid.numel)),
            **{
                f"resparsified_{k}": v for k, v in resparsify_errors(grid, codec, aggregate).items()
            },
        },
    }


VARIANTS = ("gather", "partition_fp32", "partition_bf16", "partition_resparsified")


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2
    rows_n = -(-len(results) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 4.2 * rows_n), squeeze=False)
    for ax in axes.flat[len(results) :]:
        ax.set_visible(False)
    for ax, (label, rows) in zip(axes.flat, results.items(), strict=False):
        peers = [r["peers"] for r in rows]
        for variant in VARIANTS:
            ax.plot(
                peers,
                [r["download_bytes_per_peer"][variant]["mean"] / 1e6 for r in rows],
                marker="o",
                label=variant.replace("_", ", "),
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(peers, [str(n) for n in peers])
        ax.set_xlabel("peers N")
        ax.set_ylabel("MB downloaded per peer per round")
        ax.set_title(f"topk (SparseLoCo), {label}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "10M"], choices=sorted(SIZES))
    parser.add_argument("--rounds", type=int, default=10, help="tiny: outer rounds trained")
    parser.add_argument("--inner-steps", type=int, default=10, help="tiny: H per round")
    parser.add_argument("--synthetic-rounds", type=int, default=2)
    parser.add_argument(
        "--rho", type=float, nargs="+", help="synthetic Δ cosines (default: 0, 0.5, tiny's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/bench_sparse_partition.json"))
    parser.add_argument("--plot", type=Path, help="PNG (default: --out with .png)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # small tensors; more threads only contend on a shared CPU
    codec = TopKCodec()
    started = time.perf_counter()
    envelopes = {n: envelope_nbytes(n) for n in args.peers}
    # tiny always: it calibrates ρ. One swarm of the largest N; its first N replicas stand
    # for a swarm of N (the same training, averaged over more replicas)
    tiny_payloads, tiny_deltas = train_tiny(
        max(args.peers), args.rounds, args.inner_steps, args.seed
    )
    tiny_cosines = {n: mean_cosine(tiny_deltas[:n]) for n in args.peers}
    tiny_rho = round(statistics.mean(tiny_cosines.values()), 2)
    print(f"tiny trained: Δ cosine {tiny_rho} ({time.perf_counter() - started:.0f} s)", flush=True)
    rhos = args.rho if args.rho is not None else [0.0, 0.5, tiny_rho]
    results: dict[str, list[dict]] = {}
    check: dict[str, dict[int, float]] = {"real": {}, f"synthetic, rho={tiny_rho}": {}}
    for size in args.sizes:
        model = build_model(SIZES[size], args.seed, device="meta")
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        grid = wire.chunk_grid(list(shapes.values()), codec)
        for rho in [None] if size == "tiny" else rhos:
            label = f"{size}, trained" if rho is None else f"{size}, synthetic rho={rho:g}"
            generated = synthetic(
                shapes,
                max(args.peers),
                args.synthetic_rounds,
                tiny_rho if rho is None else rho,
                args.seed,
            )
            rows = []
            for peers in args.peers:
                if rho is None:
                    row = measure(grid, codec, tiny_payloads[:peers], envelopes[peers])
                    check["real"][peers] = row["union_density"]
                    union = wire.exact_aggregate(_decoded_vectors(grid, codec, generated[:peers]))
                    check[f"synthetic, rho={tiny_rho}"][peers] = union.coords.size / grid.numel
                else:
                    row = measure(grid, codec, generated[:peers], envelopes[peers])
                rows.append(row)
                elapsed_s = time.perf_counter() - started
                print(f"{label}, N={peers}: measured ({elapsed_s:.0f} s)", flush=True)
            results[label] = rows
            del generated
    print()
    print("MB downloaded per peer per round (mean over peers, envelopes included)")
    head = " ".join(f"{v:>22}" for v in VARIANTS)
    print(f"{'model, contributions':>24} {'N':>3} {head}  union  err(resp)")
    for label, rows in results.items():
        for r in rows:
            cells = " ".join(
                f"{r['download_bytes_per_peer'][v]['mean'] / 1e6:22.4f}" for v in VARIANTS
            )
            err = r["relative_error"]["resparsified_topk_2bit"]
            print(f"{label:>24} {r['peers']:>3} {cells} {r['union_density']:6.3f} {err:9.3f}")
    document = {
        "command": " ".join(["python", "scripts/bench_sparse_partition.py", *sys.argv[1:]]),
        "codec": repr(codec),
        "rounds": args.rounds,
        "inner_steps": args.inner_steps,
        "synthetic_rounds": args.synthetic_rounds,
        "rho": rhos,
        "tiny_delta_cosine": tiny_cosines,
        "union_density_real_vs_synthetic_tiny": check,
        "envelope_bytes_per_answer": envelopes,
        "parameters": {size: SIZES[size].num_params for size in args.sizes},
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    plot_path = args.plot or args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        plot(results, plot_path)
        document["plot"] = str(plot_path)
    except ImportError:
        document["plot"] = "matplotlib not installed (pip install -e '.[plot]')"
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out} ({document['plot']}) in {document['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
