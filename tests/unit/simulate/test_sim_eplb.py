"""EPLB: the reference repository's published example, two hand-worked cases (one per policy), and a
torch port of the reference algorithm (deepseek-ai/EPLB eplb.py) on random loads."""

from __future__ import annotations

import numpy as np
import pytest

from moeprobe.simulate.eplb import balanced_packing, eplb_policy, plan_eplb, rebalance_experts, replicate_experts
from moeprobe.simulate.placement import gpu_load


def test_reference_readme_example() -> None:
    # The example in deepseek-ai/EPLB's README, with the output it prints.
    weight = np.array(
        [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
         [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    )
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert log2phy.shape == (2, 12, 2)
    for layer in range(2):  # log2phy lists exactly the slots phy2log gives each expert
        for expert in range(12):
            slots = sorted(s for s in log2phy[layer, expert] if s >= 0)
            assert slots == np.flatnonzero(phy2log[layer] == expert).tolist()


def test_hierarchical_hand_worked() -> None:
    # 8 experts in 4 groups of 2: group loads 30, 70, 10, 90. Two nodes, two GPUs per node, 12 slots.
    # Groups to nodes (heaviest first into the lightest node with room): node 0 = {g3, g2}, node 1 = {g1, g0}.
    # Node 0 experts (6, 7, 4, 5) = (50, 40, 5, 5): replicas go to 6 then 7 -> slot loads 25 20 5 5 25 20,
    # packed as [6, 7, 4] and [6, 7, 5]. Node 1 experts (2, 3, 0, 1) = (30, 40, 10, 20): replicas go to 3
    # then 2 -> slot loads 15 20 10 20 20 15, packed as [3, 3, 0] and [1, 2, 2]. Every GPU carries 50.
    weight = np.array([[10, 20, 30, 40, 5, 5, 50, 40]])
    assert eplb_policy(4, 2) == "hierarchical"
    phy2log, log2phy, logcnt = rebalance_experts(weight, 12, 4, 2, 4)
    assert phy2log.tolist() == [[6, 7, 4, 6, 7, 5, 3, 3, 0, 1, 2, 2]]
    assert logcnt.tolist() == [[1, 1, 2, 2, 1, 1, 2, 2]]
    assert log2phy.tolist() == [[[8, -1], [9, -1], [10, 11], [6, 7], [2, -1], [5, -1], [0, 3], [1, 4]]]
    plan = plan_eplb(weight, 12, 4, 2, 4)
    assert gpu_load(weight, plan).tolist() == [[50.0, 50.0, 50.0, 50.0]]


def test_global_hand_worked() -> None:
    # 3 groups do not divide over 2 nodes: global policy. Loads 10 20 30 40, 6 slots on 2 GPUs.
    # Replicas go to expert 3 (40) then expert 2 (30): slot loads 10 20 15 20 20 15 over experts
    # 0 1 2 3 3 2. Packing, heaviest first (ties in index order): GPU 0 = slots (1, 4, 0), GPU 1 = (3, 2, 5).
    weight = np.array([[10, 20, 30, 40]])
    assert eplb_policy(3, 2) == "global"
    phy2log, log2phy, logcnt = rebalance_experts(weight, 6, 3, 2, 2)
    assert phy2log.tolist() == [[1, 3, 0, 3, 2, 2]]
    assert logcnt.tolist() == [[1, 1, 2, 2]]
    assert log2phy.tolist() == [[[2, -1], [0, -1], [4, 5], [3, 1]]]
    assert gpu_load(weight, plan_eplb(weight, 6, 3, 2, 2)).tolist() == [[50.0, 50.0]]


def test_building_blocks() -> None:
    phy2log, rank, logcnt = replicate_experts(np.array([[10.0, 40.0]]), 4)
    # 40 -> two replicas of 20; then 20 vs 10 -> a third replica of expert 1.
    assert phy2log.tolist() == [[0, 1, 1, 1]] and rank.tolist() == [[0, 0, 1, 2]] and logcnt.tolist() == [[1, 3]]
    pack, rank_in = balanced_packing(np.array([[4.0, 3.0, 2.0, 1.0]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0]] and rank_in.tolist() == [[0, 0, 1, 1]]
    # One item per pack: the reference keeps the identity rather than greedy order.
    pack, rank_in = balanced_packing(np.array([[1.0, 5.0, 3.0]]), 3)
    assert pack.tolist() == [[0, 1, 2]] and rank_in.tolist() == [[0, 0, 0]]


def test_invalid_shapes_are_reported() -> None:
    weight = np.ones((1, 8))
    with pytest.raises(ValueError, match="divide evenly over 4 GPUs"):
        rebalance_experts(weight, 10, 2, 2, 4)
    with pytest.raises(ValueError, match="cannot hold"):
        rebalance_experts(weight, 4, 1, 1, 2)
    with pytest.raises(ValueError, match="groups"):
        rebalance_experts(weight, 8, 3, 3, 3)


# -- a port of the reference, in torch, loop by loop ----------------------------------------------------
torch = pytest.importorskip("torch")


def _ref_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        index = torch.arange(items, dtype=torch.int64).expand(rows, items)
        return index, torch.zeros(rows, items, dtype=torch.int64)
    order = weight.float().sort(-1, descending=True).indices
    pack_index = torch.full((rows, items), -1, dtype=torch.int64)
    rank_in_pack = torch.full((rows, items), -1, dtype=torch.int64)
    for r in range(rows):
        loads: list = [0] * num_packs
        counts = [0] * num_packs
        for item in order[r].tolist():
            pack = min((p for p in range(num_packs) if counts[p] < per_pack), key=loads.__getitem__)
            pack_index[r, item] = pack
            rank_in_pack[r, item] = counts[pack]
            loads[pack] += weight[r, item]
            counts[pack] += 1
    return pack_index, rank_in_pack


def _ref_replicate(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, num_log = weight.shape
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(rows, 1)
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(rows, num_log, dtype=torch.int64)
    every = torch.arange(rows)
    for slot in range(num_log, num_phy):
        hottest = (weight / logcnt).max(dim=-1).indices
        phy2log[:, slot] = hottest
        rank[:, slot] = logcnt[every, hottest]
        logcnt[every, hottest] += 1
    return phy2log, rank, logcnt


def _inv(perm: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(perm)
    out.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
    return out


def _ref_hierarchical(weight: torch.Tensor, num_phy: int, groups: int, nodes: int, gpus: int):
    layers, num_log = weight.shape
    group_size = num_log // groups
    per_node = groups // nodes
    per_gpu = num_phy // gpus
    group_pack, group_rank = _ref_packing(weight.unflatten(-1, (groups, group_size)).sum(-1), nodes)
    log2mlog = (((group_pack * per_node + group_rank) * group_size).unsqueeze(-1)
                + torch.arange(group_size, dtype=torch.int64)).flatten(-2)
    mlog2log = _inv(log2mlog)
    mlog_load = weight.gather(-1, mlog2log).view(-1, num_log // nodes)
    phy2mlog, phyrank, mlogcnt = _ref_replicate(mlog_load, num_phy // nodes)
    phy_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    pack, rank_in = _ref_packing(phy_load, gpus // nodes)
    pphy2phy = _inv(pack * per_gpu + rank_in)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (pphy2mlog.view(layers, nodes, -1)
                 + torch.arange(0, num_log, num_log // nodes).view(1, -1, 1)).flatten(-2)
    return (mlog2log.gather(-1, pphy2mlog), phyrank.gather(-1, pphy2phy).view(layers, -1),
            mlogcnt.view(layers, -1).gather(-1, log2mlog))


def _ref_rebalance(weight: torch.Tensor, replicas: int, groups: int, nodes: int, gpus: int):
    layers, num_log = weight.shape
    weight = weight.float()
    if groups % nodes == 0:
        phy2log, phyrank, logcnt = _ref_hierarchical(weight, replicas, groups, nodes, gpus)
    else:
        phy2log, phyrank, logcnt = _ref_hierarchical(weight, replicas, 1, 1, gpus)
    width = int(logcnt.max())
    log2phy = torch.full((layers, num_log, width), -1, dtype=torch.int64)
    log2phy.view(layers, -1).scatter_(-1, phy2log * width + phyrank,
                                      torch.arange(replicas, dtype=torch.int64).expand(layers, -1))
    return phy2log, log2phy, logcnt


@pytest.mark.parametrize(
    ("experts", "replicas", "groups", "nodes", "gpus", "kind"),
    [
        (12, 16, 4, 2, 8, "int"),
        (16, 24, 4, 2, 4, "int"),
        (16, 24, 8, 4, 8, "small-int"),  # many ties
        (32, 40, 8, 2, 8, "float"),
        (24, 30, 3, 2, 6, "int"),  # global
        (30, 36, 5, 2, 6, "float"),  # global
        (64, 72, 8, 1, 8, "int"),  # one node: hierarchical with a single node
        (8, 8, 2, 2, 4, "equal"),
    ],
)
def test_matches_reference_port(experts: int, replicas: int, groups: int, nodes: int, gpus: int, kind: str) -> None:
    rng = np.random.default_rng(experts * 1000 + replicas)
    shape = (5, experts)
    if kind == "int":
        weight = rng.integers(0, 500, shape)
    elif kind == "small-int":
        weight = rng.integers(0, 4, shape)
    elif kind == "equal":
        weight = np.full(shape, 50)
    else:
        weight = rng.gamma(0.7, 100.0, shape)
    ours = rebalance_experts(weight, replicas, groups, nodes, gpus)
    ref = _ref_rebalance(torch.from_numpy(np.asarray(weight)), replicas, groups, nodes, gpus)
    for mine, theirs in zip(ours, ref, strict=True):
        assert np.array_equal(mine, theirs.numpy())


def test_matches_reference_port_at_deepseek_scale() -> None:
    # DeepSeek-V3 shaped: 256 experts in 8 groups, 32 redundant, 4 nodes x 8 GPUs, replica loads tie often.
    rng = np.random.default_rng(256)
    weight = rng.integers(0, 40, (3, 256))
    for nodes in (4, 3):  # 8 groups over 4 nodes: hierarchical; over 3: global
        gpus = 32 if nodes == 4 else 24
        ours = rebalance_experts(weight, 288, 8, nodes, gpus)
        ref = _ref_rebalance(torch.from_numpy(weight), 288, 8, nodes, gpus)
        for mine, theirs in zip(ours, ref, strict=True):
            assert np.array_equal(mine, theirs.numpy())
