"""`shoal export`: a peer's checkpoint as a Hugging Face Llama folder.

    shoal export --checkpoint-dir DIR --out OUT

reads the newest intact checkpoint in DIR (a full replica's: it holds every tensor), and
writes OUT/config.json, OUT/model.safetensors (Hugging Face Llama parameter names, fp32)
and OUT/tokenizer.json, so that `transformers.AutoModelForCausalLM.from_pretrained(OUT)`
computes the same logits as shoal. The tokenizer is the one the peer kept in DIR (or
`--tokenizer FILE`), checked against the run's hash. A byte-level run has no tokenizer
file: its token ids are the text's UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from shoal.peer.checkpoint import load_latest
from shoal.peer.runconfig import BYTES_TOKENIZER, RunConfig

OUTER_PREFIX = "outer/"  # OuterOptimizer.state_tensors' name of the outer weights


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face Llama folder (config.json, "
        "model.safetensors, tokenizer.json)",
    )
    parser.add_argument(
        "--checkpoint-dir", required=True, metavar="DIR", help="a full replica's --checkpoint-dir"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="the run's tokenizer.json (default: the copy the peer kept in --checkpoint-dir)",
    )


def export_checkpoint(checkpoint_dir: str, out: str, tokenizer: str | None = None) -> Path:
    """Write the newest checkpoint of `checkpoint_dir` as a Hugging Face folder `out`."""
    from shoal.train import build_model, parameter_names
    from shoal.train.hf import export_hf
    from shoal.train.tokenizer import load_tokenizer

    loaded = load_latest(checkpoint_dir)
    if loaded is None:
        raise ValueError(f"--checkpoint-dir {checkpoint_dir} holds no intact checkpoint")
    tensors, manifest = loaded
    run = RunConfig.from_dict(manifest["run"])
    model = run.model_config()
    weights = {
        name.removeprefix(OUTER_PREFIX): tensor
        for name, tensor in tensors.items()
        if name.startswith(OUTER_PREFIX)
    }
    expected = parameter_names(build_model(model, seed=0, device="meta"))
    if sorted(weights) != sorted(expected):
        missing = sorted(set(expected) - set(weights))
        raise ValueError(
            f"the checkpoint in {checkpoint_dir} does not hold the whole model (a pipeline "
            f"stage's slice?); missing {missing[:4]}{' ...' if len(missing) > 4 else ''}"
        )
    tokenizer_path = _tokenizer_file(run, checkpoint_dir, tokenizer)
    loaded_tokenizer = load_tokenizer(tokenizer_path)
    export_hf(
        {name: weights[name] for name in expected},
        model,
        out,
        tokenizer_path=tokenizer_path,
        eos_id=loaded_tokenizer.eos_id,
        bos_id=None,
    )
    return Path(out)


def _tokenizer_file(run: RunConfig, checkpoint_dir: str, given: str | None) -> str | None:
    if run.tokenizer == BYTES_TOKENIZER:
        return None
    path = Path(given) if given else Path(checkpoint_dir) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"no tokenizer file at {path}: pass the run's file with --tokenizer")
    digest = f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    if digest != run.tokenizer:
        raise ValueError(f"{path} is not the run's tokenizer ({digest}, run {run.tokenizer})")
    return str(path)


def export_main(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint_dir, args.out, args.tokenizer)
    print(f"shoal export: wrote {out} (config.json, model.safetensors)")
    return 0
