"""Where experts live on an expert-parallel deployment, and what load and traffic that gives each GPU.

A placement uses DeepSeek EPLB's layout for every policy (contiguous included), so that the load, traffic
and report code is written once:

- ``phy2log`` (L, P): the logical expert held by each physical slot; slot p sits on GPU p // (P / G).
- ``phyrank`` (L, P): which replica of its expert slot p is (0 for the first).
- ``logcnt`` (L, E): replicas per logical expert.
- ``log2phy`` (L, E, max replicas): the slots of each expert by replica rank, -1 padded.

A replica carries its expert's load divided by the replica count (tokens are spread evenly over replicas),
the assumption EPLB plans with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..analysis.stats import balancedness_rows


@dataclass(frozen=True)
class Placement:
    phy2log: np.ndarray
    phyrank: np.ndarray
    logcnt: np.ndarray
    num_gpus: int
    policy: str  # "contiguous", "hierarchical" or "global"

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return self.num_physical // self.num_gpus

    @property
    def log2phy(self) -> np.ndarray:
        return log2phy_table(self.phy2log, self.phyrank, self.logcnt)

    def gpu_of_slot(self) -> np.ndarray:
        return np.arange(self.num_physical) // self.slots_per_gpu


def contiguous_placement(num_layers: int, num_experts: int, num_gpus: int) -> Placement:
    """Expert e on GPU e // (E / G), no replicas: what an EP deployment does without a balancer."""
    if num_gpus < 1 or num_experts % num_gpus:
        raise ValueError(f"{num_experts} experts do not divide evenly over {num_gpus} GPUs")
    phy2log = np.tile(np.arange(num_experts, dtype=np.int64), (num_layers, 1))
    return Placement(
        phy2log=phy2log,
        phyrank=np.zeros_like(phy2log),
        logcnt=np.ones((num_layers, num_experts), dtype=np.int64),
        num_gpus=num_gpus,
        policy="contiguous",
    )


def log2phy_table(phy2log: np.ndarray, phyrank: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    """(L, E, max replicas) slot of each replica, -1 where an expert has fewer replicas (EPLB's layout)."""
    layers, num_experts = logcnt.shape
    width = int(logcnt.max()) if logcnt.size else 0
    table = np.full((layers, num_experts * width), -1, dtype=np.int64)
    slots = np.broadcast_to(np.arange(phy2log.shape[1], dtype=np.int64), phy2log.shape)
    np.put_along_axis(table, phy2log * width + phyrank, slots, axis=1)
    return table.reshape(layers, num_experts, width)


def replica_load(load: np.ndarray, placement: Placement) -> np.ndarray:
    """(L, P) load of each physical slot: its expert's load over the expert's replica count."""
    load = np.asarray(load, dtype=np.float64)
    counts = np.take_along_axis(placement.logcnt, placement.phy2log, axis=1)
    return np.asarray(np.take_along_axis(load, placement.phy2log, axis=1) / counts)


def gpu_load(load: np.ndarray, placement: Placement) -> np.ndarray:
    """(L, G) load per GPU: the sum of its slots' loads."""
    per_slot = replica_load(load, placement)
    return np.asarray(per_slot.reshape(placement.num_layers, placement.num_gpus, placement.slots_per_gpu).sum(axis=2))


def balancedness(unit_load: np.ndarray) -> np.ndarray:
    """mean / max over the last axis (GPUs, or experts): 1 is perfect balance; 1.0 where nothing ran."""
    return balancedness_rows(unit_load, empty=1.0)


def traffic_matrix(source_load: np.ndarray, placement: Placement) -> np.ndarray:
    """(L, S, G) assignments sent from each source rank to each GPU.

    ``source_load`` (L, S, E) counts the assignments to expert e of tokens that originate on source s.
    Each expert's assignments are split evenly over its replicas (the same assumption as ``gpu_load``).
    A token sent to two experts on one GPU counts twice: this is per assignment, not deduplicated.
    """
    source_load = np.asarray(source_load, dtype=np.float64)
    layers, sources, _ = source_load.shape
    share = 1.0 / np.take_along_axis(placement.logcnt, placement.phy2log, axis=1)  # (L, P)
    index = np.broadcast_to(placement.phy2log[:, None, :], (layers, sources, placement.num_physical))
    per_slot = np.take_along_axis(source_load, index, axis=2) * share[:, None, :]
    return np.asarray(per_slot.reshape(layers, sources, placement.num_gpus, placement.slots_per_gpu).sum(axis=3))


def replicated_experts(placement: Placement) -> list[dict[str, Any]]:
    """Every expert with more than one replica: layer, expert, replica count and the GPUs holding them."""
    gpu = placement.gpu_of_slot()
    found = []
    for layer, expert in zip(*np.nonzero(placement.logcnt > 1), strict=True):
        slots = np.flatnonzero(placement.phy2log[layer] == expert)
        found.append(
            {
                "layer": int(layer),
                "expert": int(expert),
                "replicas": int(placement.logcnt[layer, expert]),
                "gpus": [int(g) for g in gpu[slots]],
            }
        )
    return found
