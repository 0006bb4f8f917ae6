"""Contracts, not names: what moeprobe relies on is checked, and a mismatch is refused loudly or counted.

The "future releases" here are real tiny transformers models whose router forward is replaced by one returning
another structure, as an upstream change would; moeprobe's own code runs unmodified.
"""

from __future__ import annotations

import subprocess
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import moeprobe
from moeprobe.hooks.compat import version_tuple
from tests.conftest import PYTHON, run_cli_env
from tests.tiny_models import build


def _router(model: nn.Module, name: str) -> nn.Module:
    return next(m for m in model.modules() if type(m).__name__ == name)


def _ids(seq: int = 5) -> torch.Tensor:
    return torch.randint(3, 90, (2, seq), generator=torch.Generator().manual_seed(0))


def _replace_forward(module: nn.Module, make: Any) -> None:
    original = module.forward
    module.forward = lambda *args, **kwargs: make(original(*args, **kwargs))  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda out: (out[0], out[1], out[2].float()), "integer tensor of top-k indices"),  # indices became floats
        (lambda out: (out[0], out[1], out[2][:, :1]), "integer tensor of top-k indices"),  # k changed
    ],
    ids=["float-indices", "wrong-k"],
)
def test_changed_router_output_is_refused_on_the_first_call(change: Any, expected: str, tmp_path: Path) -> None:
    model = build("mixtral")
    for router in (m for m in model.modules() if type(m).__name__ == "MixtralTopKRouter"):
        _replace_forward(router, change)
    probe = moeprobe.record(model, tmp_path / "t")
    try:
        with torch.no_grad():
            model(_ids())
            model(_ids())
    except (ValueError, RuntimeError, IndexError):
        pass  # some releases' experts reject the changed routing themselves; moeprobe must have refused first
    with pytest.raises(moeprobe.UnsupportedModelError) as raised:
        probe.close()
    message = str(raised.value)
    assert raised.value is probe.refusal
    assert "MixtralTopKRouter" in message and "transformers" in message and expected in message
    assert "\n" not in message
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.status == "aborted"
    assert trace.sql("select count(*) from routing").column(0)[0].as_py() == 0


def test_a_later_malformed_call_is_counted_not_recorded(tmp_path: Path) -> None:
    model = build("mixtral")
    router = _router(model, "MixtralTopKRouter")
    calls = {"n": 0}

    def change(out: Any) -> Any:
        calls["n"] += 1
        return (out[0], out[1], out[2].float()) if calls["n"] == 2 else out

    _replace_forward(router, change)
    with moeprobe.record(model, tmp_path / "t") as probe, torch.no_grad():
        model(_ids())
        model(_ids())
        model(_ids())
    assert probe.anomalies == {"contract:layer0": 1}
    trace = moeprobe.open_trace(tmp_path / "t")
    per_step = trace.sql("select step, count(distinct layer) n from routing group by step order by step").to_pylist()
    assert per_step == [{"step": 0, "n": 2}, {"step": 1, "n": 1}, {"step": 2, "n": 2}]
    assert trace.manifest["counters"]["anomalies"] == {"contract:layer0": 1}


class IdsRouter(nn.Module):
    def __init__(self, hidden: int = 16, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, experts, bias=False)
        self.k = k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, chosen = torch.topk(self.proj(x).softmax(-1), self.k, dim=-1)
        return chosen, weights


class IdsBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = IdsRouter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen, weights = self.router(x.reshape(-1, x.shape[-1]))
        return x + weights.sum(-1).reshape(x.shape[:-1])[..., None]


class IdsModel(nn.Module):
    """A custom model whose forward calls its token ids `ids`, and takes them as a keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(IdsBlock() for _ in range(2))

    def forward(self, *, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return h


def test_custom_model_token_argument_named_by_the_spec(tmp_path: Path) -> None:
    model = IdsModel().eval()
    spec = moeprobe.RouterSpec(indices=0, weights=1, num_experts=4, top_k=2, tokens="ids")
    a, b = torch.randint(0, 50, (2, 5)), torch.randint(0, 50, (2, 3))
    with moeprobe.record(model, tmp_path / "t", routers={IdsRouter: spec}) as probe, torch.no_grad():
        probe.tag(batch="a")
        model(ids=a)
        probe.tag(batch="b")
        model(ids=b)
    assert probe.anomalies == {}
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.manifest["counters"]["anomalies"] == {}
    rows = trace.sql("select sequence, position, token_id from routing where layer = 1 and k = 0 order by step, sequence, position").to_pylist()
    expected = [(s, p, int(a[s, p])) for s in range(2) for p in range(5)] + [(2 + s, p, int(b[s, p])) for s in range(2) for p in range(3)]
    assert [(r["sequence"], r["position"], r["token_id"]) for r in rows] == expected
    tags = trace.sql("select sequence, value from tags order by sequence").to_pylist()
    assert [(t["sequence"], t["value"]) for t in tags] == [(0, "a"), (1, "a"), (2, "b"), (3, "b")]


class PositionalModel(IdsModel):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(ids=ids)


def test_custom_model_token_ids_found_by_contract(tmp_path: Path) -> None:
    model = PositionalModel().eval()
    spec = moeprobe.RouterSpec(indices=0, weights=1, num_experts=4, top_k=2)
    ids = torch.randint(0, 50, (3, 4))
    with moeprobe.record(model, tmp_path / "t", routers={IdsRouter: spec}) as probe, torch.no_grad():
        model(ids)
    assert probe.anomalies == {}
    trace = moeprobe.open_trace(tmp_path / "t")
    got = trace.sql("select list(token_id order by sequence, position) from routing where layer = 0 and k = 0").column(0)[0].as_py()
    assert got == ids.reshape(-1).tolist()
    assert trace.sql("select count(distinct sequence) from routing").column(0)[0].as_py() == 3


@pytest.mark.parametrize(
    "spec, expected",
    [
        (moeprobe.RouterSpec(indices=1, weights=0, num_experts=4, top_k=2), "expert indices must be an integer tensor"),
        (moeprobe.RouterSpec(indices=0, weights=1, num_experts=4, top_k=3), "top_k=3"),
        (moeprobe.RouterSpec(indices=5, weights=1, num_experts=4, top_k=2), "IndexError"),
        (moeprobe.RouterSpec(indices=0, weights=1, scores=1, num_experts=8, top_k=2), "num_experts=8"),
    ],
    ids=["swapped", "wrong-top-k", "bad-selector", "wrong-num-experts"],
)
def test_wrong_router_spec_is_one_line_at_the_first_call(spec: Any, expected: str, tmp_path: Path) -> None:
    model = PositionalModel().eval()
    with (
        pytest.raises(moeprobe.UnsupportedModelError) as raised,
        moeprobe.record(model, tmp_path / "t", routers={IdsRouter: spec}, flush_interval=60),
        torch.no_grad(),
    ):
        model(torch.randint(0, 50, (2, 3)))
    message = str(raised.value)
    assert "'blocks.0.router' (IdsRouter" in message and "\n" not in message
    assert expected in message
    assert moeprobe.open_trace(tmp_path / "t").status == "aborted"


def test_newer_transformers_is_recorded_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release newer than the newest tested records, with one warning. The installed release is made "newer"
    by lowering the tested bound (the one constant the check reads), whatever transformers this runs on."""
    import transformers

    from moeprobe.hooks import compat

    installed = version_tuple(transformers.__version__)
    assert installed >= version_tuple(compat.OLDEST_TESTED)
    monkeypatch.setattr(compat, "NEWEST_TESTED", "5.0.0" if installed > (5, 0, 0) else "4.99.0")
    monkeypatch.setattr(compat, "_warned", set())
    with pytest.warns(compat.NewerTransformersWarning, match="newer than the newest tested"):
        moeprobe.record(build("mixtral"), None).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.NewerTransformersWarning)
        moeprobe.record(build("mixtral"), None).close()  # once per process, not per probe


def test_record_cli_survives_a_refused_model(tmp_path: Path) -> None:
    """Under `moeprobe record`, an adapter refusal never crashes the job: one line on stderr, trace aborted."""
    job = tmp_path / "job.py"
    job.write_text(
        textwrap.dedent(
            """
            import torch
            from tests.tiny_models import build
            model = build("mixtral")
            for m in model.modules():
                if type(m).__name__ == "MixtralTopKRouter":
                    forward = m.forward
                    m.forward = lambda *a, f=forward, **k: (lambda o: (o[0], o[1], o[2].float()))(f(*a, **k))
            with torch.no_grad():
                model(torch.randint(3, 90, (1, 4)))
                model(torch.randint(3, 90, (1, 4)))
            print("job finished")
            """
        )
    )
    result = subprocess.run(
        [PYTHON, "-m", "moeprobe", "record", "-o", str(tmp_path / "t"), "--", PYTHON, str(job)],
        capture_output=True, text=True, env=run_cli_env(), timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "job finished" in result.stdout
    assert "Traceback" not in result.stderr
    refusals = [line for line in result.stderr.splitlines() if "cannot capture MoE layer" in line]
    assert len(refusals) == 1
    assert moeprobe.open_trace(tmp_path / "t").status == "aborted"


def test_a_malformed_call_after_the_parts_places_are_known_is_counted(tmp_path: Path) -> None:
    """From a layer's third call hook capture takes the parts from where it found them before (noted_routing.at_slots):
    an output whose indices turn floating there falls back to identifying the parts, and is counted, not recorded."""
    model = build("mixtral")
    router = _router(model, "MixtralTopKRouter")
    calls = {"n": 0}

    def change(out: Any) -> Any:
        calls["n"] += 1
        return (out[0], out[1], out[2].float()) if calls["n"] == 4 else out

    _replace_forward(router, change)
    with moeprobe.record(model, tmp_path / "t") as probe, torch.no_grad():
        for _ in range(5):
            model(_ids())
    assert probe.anomalies == {"contract:layer0": 1}
    trace = moeprobe.open_trace(tmp_path / "t")
    per_step = trace.sql("select step, count(distinct layer) n from routing group by step order by step").to_pylist()
    assert per_step == [{"step": s, "n": 1 if s == 3 else 2} for s in range(5)]
