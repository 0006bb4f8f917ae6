"""DeepSeek's Expert Parallelism Load Balancer (deepseek-ai/EPLB, DeepSeek-V3 section 3.4), in numpy.

The algorithm and its outputs follow the reference ``eplb.py`` step for step, in float32 like it, with the
same tie rules (item weights sorted in the order torch's CPU sort leaves equal values, see ``stdsort``; the
first pack among equally light ones; the first expert among equally loaded ones), so that
``rebalance_experts`` returns the reference's ``phy2log``, ``log2phy`` and ``logcnt``:

1. ``replicate_experts``: each extra physical slot goes to the expert with the largest load / replicas.
2. ``balanced_packing``: items, heaviest first, go to the lightest pack that still has room; every pack ends
   with the same number of items.
3. Hierarchical policy (expert groups divide evenly over nodes): pack groups onto nodes, replicate inside
   each node, pack each node's replicas onto its GPUs. Otherwise the global policy: the same with one group
   and one node.

The packing loop runs over items and is vectorised over layers, so 58 layers cost what one does.
"""

from __future__ import annotations

import numpy as np

from .placement import Placement, log2phy_table
from .stdsort import argsort_desc_like_torch


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the n items of each row into ``num_packs`` packs of n / num_packs items, balancing the weights.

    Returns ``pack_index`` and ``rank_in_pack``, both (X, n) int64.
    """
    weight = np.asarray(weight, dtype=np.float32)
    rows, items = weight.shape
    if num_packs < 1 or items % num_packs:
        raise ValueError(f"{items} items do not pack evenly into {num_packs} packs")
    per_pack = items // num_packs
    if per_pack == 1:
        # The reference short-cuts this case to the identity (not the greedy order); so do we.
        pack_index = np.broadcast_to(np.arange(items, dtype=np.int64), (rows, items)).copy()
        return pack_index, np.zeros((rows, items), dtype=np.int64)
    # Equal weights are common (replicas of one expert carry the same load); the order torch leaves them
    # in decides which replica goes where, so follow it rather than a stable sort.
    order = argsort_desc_like_torch(weight)
    pack_index = np.full((rows, items), -1, dtype=np.int64)
    rank_in_pack = np.full((rows, items), -1, dtype=np.int64)
    pack_weight = np.zeros((rows, num_packs), dtype=np.float32)
    pack_items = np.zeros((rows, num_packs), dtype=np.int64)
    row = np.arange(rows)
    for j in range(items):
        item = order[:, j]
        # argmin returns the first of equally light packs, as Python's min() does in the reference.
        pack = np.where(pack_items < per_pack, pack_weight, np.float32(np.inf)).argmin(axis=1)
        pack_index[row, item] = pack
        rank_in_pack[row, item] = pack_items[row, pack]
        pack_weight[row, pack] += weight[row, item]
        pack_items[row, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give ``num_physical`` slots to the experts of each row, minimising the largest load per replica.

    Returns ``phy2log`` (X, P), ``phyrank`` (X, P) and ``logcnt`` (X, E), all int64.
    """
    weight = np.asarray(weight, dtype=np.float32)
    rows, num_logical = weight.shape
    if num_physical < num_logical:
        raise ValueError(f"{num_physical} physical slots cannot hold {num_logical} experts")
    phy2log = np.tile(np.arange(num_physical, dtype=np.int64), (rows, 1))
    phyrank = np.zeros((rows, num_physical), dtype=np.int64)
    logcnt = np.ones((rows, num_logical), dtype=np.int64)
    row = np.arange(rows)
    for slot in range(num_logical, num_physical):
        # float32 division as in the reference (torch divides a float32 tensor by an int64 one in float32).
        hottest = (weight / logcnt.astype(np.float32)).argmax(axis=1)
        phy2log[:, slot] = hottest
        phyrank[:, slot] = logcnt[row, hottest]
        logcnt[row, hottest] += 1
    return phy2log, phyrank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1], dtype=perm.dtype), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups onto nodes, replicas within nodes, replicas onto each node's GPUs.

    Returns ``phy2log`` (L, P), ``phyrank`` (L, P) and ``logcnt`` (L, E).
    """
    weight = np.asarray(weight, dtype=np.float32)
    layers, num_logical = weight.shape
    if num_groups < 1 or num_logical % num_groups:
        raise ValueError(f"{num_logical} experts do not split into {num_groups} groups")
    if num_nodes < 1 or num_groups % num_nodes:
        raise ValueError(f"{num_groups} groups do not divide evenly over {num_nodes} nodes")
    if num_gpus % num_nodes:
        raise ValueError(f"{num_gpus} GPUs do not divide evenly over {num_nodes} nodes")
    if num_physical % num_gpus:
        raise ValueError(f"{num_physical} physical experts do not divide evenly over {num_gpus} GPUs")
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical // num_gpus
    experts_per_node = num_logical // num_nodes

    # 1. Pack groups onto nodes; renumber experts node-major ("mlog": logical within a node).
    group_load = weight.reshape(layers, num_groups, group_size).sum(axis=2)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)
    ).reshape(layers, num_logical)
    mlog2log = _inverse(log2mlog)

    # 2. Replicate within each node: rows become (layer, node).
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, experts_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, num_physical // num_nodes)

    # 3. Pack each node's replicas onto its GPUs.
    phy_load = np.take_along_axis(mlog_load / mlogcnt.astype(np.float32), phy2mlog, axis=1)
    pack_index, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack_index * slots_per_gpu + rank_in_pack)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    node_offset = np.arange(0, num_logical, experts_per_node).reshape(1, -1, 1)
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1) + node_offset).reshape(layers, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, axis=1)
    return phy2log, pphyrank, logcnt


def eplb_policy(num_groups: int, num_nodes: int) -> str:
    """The reference's rule: hierarchical when expert groups divide evenly over nodes, else global."""
    return "hierarchical" if num_nodes >= 1 and num_groups % num_nodes == 0 else "global"


def plan_eplb(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> Placement:
    """Run EPLB on a (layers, experts) load and return the placement (phyrank kept for ``log2phy``)."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"EPLB needs a (layers, experts) load, got shape {weight.shape}")
    policy = eplb_policy(num_groups, num_nodes)
    if policy == "hierarchical":
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    return Placement(phy2log=phy2log, phyrank=phyrank, logcnt=logcnt, num_gpus=num_gpus, policy=policy)


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference entry point: ``phy2log`` (L, R), ``log2phy`` (L, E, max replicas), ``logcnt`` (L, E)."""
    plan = plan_eplb(weight, num_replicas, num_groups, num_nodes, num_gpus)
    return plan.phy2log, log2phy_table(plan.phy2log, plan.phyrank, plan.logcnt), plan.logcnt
