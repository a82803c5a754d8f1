"""shoal.train: what is trained — the default byte-level LLaMA-style model, its data,
device selection, evaluation, and per-preset training recipes. Knows nothing of the
network; peer/ and optim/ import from here, never the other way."""

from shoal.train.data import DOC_SEPARATOR, ByteData, DataConfig, load_corpus, shard_for
from shoal.train.device import autocast_context, resolve_device
from shoal.train.evaluate import evaluate
from shoal.train.model import PRESETS, ModelConfig, Transformer, build_model, parameter_names
from shoal.train.recipe import RECIPES, Recipe
from shoal.train.stream import TokenStream
from shoal.train.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from shoal.train.tokens import TokenData, load_data

__all__ = [
    "DOC_SEPARATOR",
    "PRESETS",
    "RECIPES",
    "ByteData",
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "ModelConfig",
    "Recipe",
    "TokenData",
    "TokenStream",
    "Tokenizer",
    "Transformer",
    "autocast_context",
    "build_model",
    "evaluate",
    "load_corpus",
    "load_data",
    "load_tokenizer",
    "parameter_names",
    "resolve_device",
    "shard_for",
]
