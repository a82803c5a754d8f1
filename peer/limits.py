"""Body limits sized from the run, so that what a run must send always fits.

The largest request a peer receives is a pipeline hop: a microbatch's activations (or their
gradients) with its token ids. A microbatch holds at most the run's batch (the driver cuts
batches into microbatches), and the largest activation codec is uncompressed fp32 (`none`),
so every hop of a run fits in twice that plus headroom for the envelope and the ids. Control
messages (a full peer table) fit in the floor. `--max-request-bytes` overrides the derived
limit; responses (contributions, state chunks) have their own `--max-response-bytes`.
"""

from __future__ import annotations

from shoal.peer.config import PeerConfig

FLOOR_BYTES = 8 * 2**20  # a peer table of MAX_ENTRIES entries, with room to spare
HEADROOM_BYTES = 2**20


def hop_bytes(config: PeerConfig) -> int:
    """The largest pipeline hop body of the run: fp32 activations of a whole batch plus
    its token ids (int32)."""
    run = config.run
    tokens = run.inner.batch_size * run.inner.seq_len
    return tokens * (4 * int(run.model["d_model"]) + 4)


def request_limit_bytes(config: PeerConfig) -> int:
    """The request body limit this peer enforces (see the module docstring)."""
    if config.protocol.max_request_bytes is not None:
        return config.protocol.max_request_bytes
    if not config.run.stages:
        return FLOOR_BYTES
    return max(FLOOR_BYTES, 2 * hop_bytes(config) + HEADROOM_BYTES)
