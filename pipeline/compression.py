"""Activation compression of a pipeline replica, chosen by one flag (`--activation`):

    none           raw float32 activations and gradients (lossless)
    int8           per-token int8 (d_model + 4 bytes per token)
    subspace:R     Protocol Models' subspace codec at R times fewer bytes than float32
                   (k = subspace_dim_for_ratio(d_model, R) float16 coordinates per token);
                   the replica's weights are confined to the subspace (pipeline/subspace.py)
    subspace-int8:R  the same with int8 coordinates: about twice the k at the same bytes
    subspace-int4:R  the same with 4-bit coordinates (centred and scaled per payload): about
                   four times the k; the best loss at 32x (README)

Every peer of one pipeline replica uses the same setting (a stage peer refuses a hop in
another codec, and drivers route only to stage peers that advertise theirs), while other
replicas may choose differently: well-connected replicas uncompressed, weak ones compressed.
The subspace basis derives from the run's seed, so every stage of a replica holds the same
basis without exchanging it; payloads carry its id and a mismatch is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.compression.activation import (
    ACTIVATION_CODECS,
    ActivationCodec,
    SubspaceActivationCodec,
    get_activation_codec,
)
from shoal.compression.subspace_basis import SubspaceBasis, subspace_dim_for_ratio
from shoal.pipeline.subspace import basis_for_model
from shoal.train.model import ModelConfig

SUBSPACE_COORDINATES = {
    name: codec.coordinates
    for name, codec in ACTIVATION_CODECS.items()
    if issubclass(codec, SubspaceActivationCodec)
}


@dataclass(frozen=True)
class ActivationSetting:
    codec: ActivationCodec
    basis: SubspaceBasis | None  # subspace: the stages' weights are confined to it
    spec: str

    @property
    def name(self) -> str:
        return self.codec.name


def parse_activation(spec: str, config: ModelConfig, seed: int) -> ActivationSetting:
    """Build the codec (and confinement) for `--activation SPEC`; ValueError names the flag."""
    name, _, option = spec.partition(":")
    if name in ("none", "int8"):
        if option:
            raise ValueError(f"--activation {name} takes no ratio, got {spec!r}")
        return ActivationSetting(get_activation_codec(name), None, spec)
    if name in SUBSPACE_COORDINATES:
        try:
            ratio = float(option)
        except ValueError:
            raise ValueError(
                f"--activation {name} needs a ratio, e.g. {name}:32, got {spec!r}"
            ) from None
        if not ratio >= 1:
            raise ValueError(f"--activation {name} ratio must be >= 1, got {spec!r}")
        k = subspace_dim_for_ratio(
            config.d_model, ratio, config.vocab_size, SUBSPACE_COORDINATES[name]
        )
        basis = basis_for_model(config, k, seed)
        return ActivationSetting(get_activation_codec(name, basis=basis), basis, spec)
    raise ValueError(
        "--activation must be none, int8, subspace:RATIO, subspace-int8:RATIO or "
        f"subspace-int4:RATIO, got {spec!r}"
    )
