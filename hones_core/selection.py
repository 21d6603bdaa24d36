"""Neuron selections: which (layer, neuron) pairs a method picks, and how selections compare.

A `Selection` is `{layer: sorted neuron indices}` holding only layers with at least one
neuron. Everything that picks, counts, compares or groups selections lives here: the budget
rule, the global top of a score matrix, random neurons with given per-layer counts, set views,
Jaccard overlap, and the cross-task groups of the masking analysis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

Selection = dict[int, list[int]]


def budget(ratio: float, total: int) -> int:
    """Neurons in a selection of `ratio` of `total`: max(1, round(ratio * total)).

    Raises:
        ValueError: `ratio` is not in (0, 1].
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1):
        raise ValueError(f"the neuron budget must be between 0 % and 100 % (a ratio in (0, 1], e.g. 0.01 for "
                         f"1 %); got {ratio!r}")
    return max(1, round(ratio * total))


def top_flat(scores: torch.Tensor, ratio: float, *, positive_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and scores of the global top `ratio` of a `[layers, intermediate]` matrix.

    Best first; ties broken by the lower flat index (a stable sort). With `positive_only`,
    only scores > 0 are taken, so a budget larger than the number of positive scores gives
    fewer neurons instead of filling up with zeros in index order (layer 0 first).
    """
    flat = scores.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:budget(ratio, flat.numel())]
    if positive_only:
        order = order[flat[order] > 0]
    return order, flat[order]


def from_flat(indices: Sequence[int], width: int) -> Selection:
    """Flat indices into a `[layers, width]` matrix -> a Selection."""
    out: Selection = {}
    for index in indices:
        out.setdefault(int(index) // width, []).append(int(index) % width)
    return {layer: sorted(out[layer]) for layer in sorted(out)}


def random_like(counts: Mapping[int, int], width: int, *, seed: int = 0) -> Selection:
    """`counts[layer]` neurons per layer drawn uniformly from `range(width)`, layers in the order given.

    One `torch.Generator().manual_seed(seed)` draws a permutation per layer, so the same
    counts and seed give the same neurons on every machine.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return {layer: sorted(torch.randperm(width, generator=generator)[:count].tolist())
            for layer, count in counts.items()}


def counts(selection: Selection) -> dict[int, int]:
    """Neurons per layer."""
    return {layer: len(neurons) for layer, neurons in selection.items()}


def size(selection: Selection) -> int:
    """Number of (layer, neuron) pairs."""
    return sum(len(v) for v in selection.values())


def as_set(selection: Selection) -> set[tuple[int, int]]:
    return {(int(layer), int(n)) for layer, neurons in selection.items() for n in neurons}


def from_set(pairs: set[tuple[int, int]]) -> Selection:
    out: Selection = {}
    for layer, n in sorted(pairs):
        out.setdefault(layer, []).append(n)
    return out


def check_selections(selections, name: str = "selections") -> dict[str, set[tuple[int, int]]]:
    """`{task: Selection}` as `{task: set of pairs}`, refusing anything else with a message naming `name`.

    Raises:
        ValueError: not a non-empty mapping of mappings.
    """
    if not isinstance(selections, Mapping) or not selections:
        raise ValueError(f"{name} must be a non-empty dict task -> {{layer: [neuron, ...]}}")
    sets: dict[str, set[tuple[int, int]]] = {}
    for task, selection in selections.items():
        if not isinstance(selection, Mapping):
            raise ValueError(f"{name}[{task!r}] must be a dict layer -> [neuron, ...], "
                             f"got {type(selection).__name__}")
        sets[str(task)] = as_set(selection)
    return sets


def jaccard(a: Selection, b: Selection) -> float:
    """|A∩B| / |A∪B|; two empty selections overlap 0."""
    sa, sb = as_set(a), as_set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


def jaccard_matrix(selections: Mapping[str, Selection]) -> tuple[list[str], np.ndarray]:
    """Pairwise Jaccard overlap of the tasks' selections.

    Returns the task names (in the order given) and a symmetric `[tasks, tasks]` matrix.

    Raises:
        ValueError: `selections` is not a non-empty dict of selections.
    """
    sets = check_selections(selections)
    tasks = list(sets)
    matrix = np.zeros((len(tasks), len(tasks)))
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            union = sets[a] | sets[b]
            matrix[i, j] = len(sets[a] & sets[b]) / len(union) if union else 0.0
    return tasks, matrix


def overlap_groups(selections: Mapping[str, Selection]) -> dict[str, dict[str, Selection]]:
    """For each task, its neurons split by how many tasks select them.

    Returns `{task: {"task-specific": ..., "shared by 2": ..., "shared by 3": ..., "shared by all 4": ...}}`
    (group names follow the number of tasks given; empty groups are left out).
    """
    sets = {task: as_set(sel) for task, sel in selections.items()}
    times: dict[tuple[int, int], int] = {}
    for pairs in sets.values():
        for pair in pairs:
            times[pair] = times.get(pair, 0) + 1
    n_tasks = len(sets)

    def name(k: int) -> str:
        return "task-specific" if k == 1 else (f"shared by all {k}" if k == n_tasks else f"shared by {k}")

    out: dict[str, dict[str, Selection]] = {}
    for task, pairs in sets.items():
        groups: dict[str, set] = {}
        for pair in pairs:
            groups.setdefault(name(times[pair]), set()).add(pair)
        out[task] = {group: from_set(members) for group, members in sorted(groups.items(), key=lambda g: len(g[0]))}
    return out


def layer_sums(values: np.ndarray, selection: Selection) -> np.ndarray:
    """Per-layer sum of `values[layer, neuron]` over the selected neurons, `[layers]` (0 where none)."""
    sums = np.zeros(values.shape[0])
    for layer, neurons in selection.items():
        sums[layer] = float(values[layer, neurons].sum())
    return sums


__all__ = ["Selection", "budget", "top_flat", "from_flat", "random_like", "counts", "size", "as_set", "from_set",
           "check_selections", "jaccard", "jaccard_matrix", "overlap_groups", "layer_sums"]
