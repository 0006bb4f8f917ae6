"""Tiny transformers MoE models built from configs (random weights, CPU), one per supported family."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

VOCAB = 96


def _common(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    base.update(extra)
    return base


def mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**_common(num_local_experts=6, num_experts_per_tok=2)))


def deepseek_v3() -> nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        **_common(
            num_hidden_layers=3,
            num_key_value_heads=4,  # multi-head latent attention: as many KV heads as query heads
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        )
    )
    model = DeepseekV3ForCausalLM(config)
    # A non-zero correction bias, so that capture is checked where biased choice and weights differ.
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "DeepseekV3TopkRouter":
                module.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, module.e_score_correction_bias.numel()))
    return model


def qwen2_moe() -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(**_common(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24, decoder_sparse_step=1))
    )


def qwen3_moe() -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(
        Qwen3MoeConfig(**_common(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, decoder_sparse_step=1))
    )


def olmoe() -> nn.Module:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM(OlmoeConfig(**_common(num_experts=6, num_experts_per_tok=2)))


def gpt_oss() -> nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        **_common(num_local_experts=6, num_experts_per_tok=2, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    )
    model = GptOssForCausalLM(config)
    with torch.no_grad():  # GPT-OSS initialises its router to zeros: give it something to choose by
        for module in model.modules():
            if type(module).__name__ == "GptOssTopKRouter":
                module.weight.normal_(0, 0.5)
                module.bias.normal_(0, 0.1)
    return model


def llama4() -> nn.Module:
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(
        **_common(
            intermediate_size=48,
            intermediate_size_mlp=48,
            num_local_experts=4,
            num_experts_per_tok=1,
            head_dim=8,
            interleave_moe_layer_step=1,
            no_rope_layers=[1, 1],
            attention_chunk_size=64,
        )
    )
    return Llama4ForCausalLM(config)


def switch_transformers() -> nn.Module:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_experts=4,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        expert_capacity=64,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    return SwitchTransformersForConditionalGeneration(config)


def glm4_moe() -> nn.Module:
    """A family without an adapter: captured by the generic path (the experts module's inputs)."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    config = Glm4MoeConfig(
        **_common(
            moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=0, head_dim=8,
        )
    )
    return Glm4MoeForCausalLM(config)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "mixtral": mixtral,
    "deepseek_v3": deepseek_v3,
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": qwen3_moe,
    "olmoe": olmoe,
    "gpt_oss": gpt_oss,
    "llama4": llama4,
    "switch_transformers": switch_transformers,
}


# Families captured without an adapter of their own.
GENERIC: dict[str, Callable[[], nn.Module]] = {"glm4_moe": glm4_moe}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = {**FAMILIES, **GENERIC}[family]()
    return model.eval()
