"""The start-up memory plan: what each component of a peer holds on each device."""

from shoal.train import PRESETS
from shoal.train.memory import activation_bytes, format_plan, memory_plan


def test_plan_counts_weights_optimizer_and_outer_state():
    config = PRESETS["llama-125m"]
    lines = memory_plan(config, config.num_params, 16, 1024, "cuda:0", False, 8 * 10**8, 5 * 10**8)
    by_name = {line.component: line for line in lines}
    weights = 4 * config.num_params
    assert by_name["inner weights (fp32)"].bytes == weights
    assert by_name["AdamW moments (fp32)"].bytes == 2 * weights
    assert {line.device for line in lines} == {"cuda:0", "cpu"}
    assert by_name["outer weights and optimizer state"].device == "cpu"
    text = format_plan(lines)
    assert "total" in text and "cuda:0" in text and "MiB" in text


def test_activation_estimate_follows_batch_precision_and_recompute():
    config = PRESETS["llama-125m"]
    base = activation_bytes(config, 8, 1024, 2, checkpointing=False)
    assert activation_bytes(config, 16, 1024, 2, checkpointing=False) == 2 * base
    assert activation_bytes(config, 8, 1024, 4, checkpointing=False) > base  # fp32 on a CPU
    recomputed = activation_bytes(config, 8, 1024, 2, checkpointing=True)
    logits = 2 * 4 * 8 * 1024 * config.vocab_size  # fp32 logits and their gradient, either way
    # block inputs plus one block's activations, instead of every block's
    assert recomputed - logits < (base - logits) / 3
