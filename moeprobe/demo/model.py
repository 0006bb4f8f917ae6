"""The demo architecture: a tiny ``DeepseekV3ForCausalLM`` built from a config (no download).

Layer 0 is dense, the rest are MoE layers with 16 routed experts (top-4), one shared expert, group-limited
routing (4 groups, keep 2) and sigmoid scores with ``e_score_correction_bias``, as in DeepSeek-V3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

if TYPE_CHECKING:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

# Plain dict so the checkpoint card can store exactly what built the model.
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 384,  # the dense layer 0
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "max_position_embeddings": 512,
    "rope_interleave": True,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "num_mtp_layers": 0,
}


def build_config(**overrides: Any) -> DeepseekV3Config:
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**{**CONFIG, **overrides})


def build_model(seed: int = 0, **overrides: Any) -> DeepseekV3ForCausalLM:
    """A randomly initialised demo model; the same seed gives bit-identical weights."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(build_config(**overrides))
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.eval()
    return model


def moe_routers(model: Any) -> list[Any]:
    """The routers of the MoE layers, in model order (layer 0 is dense and has none)."""
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
