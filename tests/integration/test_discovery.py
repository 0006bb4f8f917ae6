"""Finding routers: the generic path for families without an adapter, declared routers in custom models,
and a clear error naming the module when a router cannot be interpreted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import moeprobe


def _glm4_moe() -> nn.Module:
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(0)
    config = Glm4MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=0, head_dim=8,
    )
    return Glm4MoeForCausalLM(config).eval()


def test_generic_path_captures_what_the_experts_receive(tmp_path: Path) -> None:
    model = _glm4_moe()
    truth: list[np.ndarray] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args: truth.append(args[1].numpy().copy()))
        for m in model.modules()
        if type(m).__name__ == "Glm4MoeNaiveMoe" or type(m).__name__.endswith("Experts")
    ]
    ids = torch.randint(3, 64, (2, 5))
    with moeprobe.record(model, tmp_path / "t"):
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for h in handles:
        h.remove()
    trace = moeprobe.open_trace(tmp_path / "t")
    assert {layer["family"] for layer in trace.layers} == {"generic"}
    assert trace.layers[0]["capture"] == "experts"
    got = trace.sql("select list(expert order by sequence, position, k) e from routing group by step, layer order by step, layer").column(0).to_pylist()
    assert len(got) == len(truth)
    for g, t in zip(got, truth, strict=True):
        assert g == t.reshape(-1).tolist()


class TinyRouter(nn.Module):
    """A custom router returning a dict, as a user's own model might."""

    def __init__(self, hidden: int, experts: int, k: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, experts, bias=False)
        self.k = k

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.proj(x)
        weights, chosen = torch.topk(logits.softmax(-1), self.k, dim=-1)
        return {"logits": logits, "chosen": chosen, "gates": weights}


class TinyMoE(nn.Module):
    def __init__(self, hidden: int = 16, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.router = TinyRouter(hidden, experts, k)
        self.experts = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routed = self.router(flat)
        out = torch.zeros_like(flat)
        for slot in range(routed["chosen"].shape[1]):
            for e, expert in enumerate(self.experts):
                hit = routed["chosen"][:, slot] == e
                out[hit] += routed["gates"][hit, slot, None] * expert(flat[hit])
        return out.reshape(x.shape)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(TinyMoE() for _ in range(2))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return h


def test_declared_router_in_a_custom_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 50, (2, 6))
    spec = moeprobe.RouterSpec(indices="chosen", weights="gates", scores="logits", num_experts=4, top_k=2, scoring="softmax")
    with torch.no_grad(), moeprobe.record(model, tmp_path / "t", routers={TinyRouter: spec}, logits=True):
        model(ids)
    trace = moeprobe.open_trace(tmp_path / "t")
    assert [layer["name"] for layer in trace.layers] == ["blocks.0", "blocks.1"]
    h = model.embed(ids).reshape(-1, 16)
    expected = torch.topk(model.blocks[0].router.proj(h).softmax(-1), 2, dim=-1).indices
    got = trace.sql("select list(expert order by sequence, position, k) from routing where layer = 0").column(0)[0].as_py()
    assert got == expected.reshape(-1).tolist()
    tokens = trace.sql("select list(token_id order by sequence, position) from routing where layer = 1 and k = 0").column(0)[0].as_py()
    assert tokens == ids.reshape(-1).tolist()
    assert trace.sql("select count(*) from scores").column(0)[0].as_py() == 2 * 12


def test_glob_declaration_by_module_name(tmp_path: Path) -> None:
    model = TinyLM().eval()
    spec = moeprobe.RouterSpec(indices="chosen", weights="gates", num_experts=4, top_k=2)
    with torch.no_grad(), moeprobe.record(model, tmp_path / "t", routers={"blocks.*.router": spec}):
        model(torch.randint(0, 50, (1, 3)))
    assert len(moeprobe.open_trace(tmp_path / "t").layers) == 2


def test_undeclared_custom_router_is_an_error_naming_it() -> None:
    with pytest.raises(moeprobe.UnsupportedModelError, match=r"'blocks\.0\.router' \(TinyRouter\)"):
        moeprobe.record(TinyLM(), None)


def test_dense_model_is_an_error() -> None:
    with pytest.raises(moeprobe.UnsupportedModelError, match="no MoE router found in Sequential"):
        moeprobe.record(nn.Sequential(nn.Linear(4, 4)), None)
