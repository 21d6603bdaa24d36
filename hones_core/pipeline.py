"""The `rank` run: head localization then head-conditioned attribution, per task, resumable.

Progress lives in `<out>/.progress/`: after every layer of head scores and every
head-conditioned DVP pass, the partial results are written atomically (write, then
rename). A run killed at any point and restarted with the same arguments skips what is
done and produces the same artifact; a restart with different arguments refuses to mix
the two and says how to start over. When every task is done the artifact is written and
the progress folder removed.

Several processes (`accelerate launch`, see `distributed`): every process reads the same
progress folder (it must be on a file system they share), only the main process writes it,
and what it records are sums over all processes, so a run may be resumed with another
number of processes.

Baselines: `attribute` gives each task "activation", "dvp", "ap" and "ma"; "ape" compares the
four tasks' AP, so it is added to every task only when one run ranks all four (`--task all`);
otherwise no task gets it and each task's notes say why. The base plan's saved sums carry
the AP / MA token sums; sums saved without them (an older version) make that plan run again.

Discovery statistics: each task also gets its per-neuron statistics of z at the last prompt
position (`activation_stats`, stored as `<task>/stats.safetensors`), one more prompt pass
over its items, saved in the progress folder like the rest. `add_stats` computes them for an
artifact that has none (written before they existed), after checking that the data given is
the split the artifact was ranked on (its images' content digests and item counts).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from . import __version__, rankings
from .activation_stats import activation_sums, stats_from_sums
from .attribution import Sums, ape_scores, attribute
from .distributed import Shard
from .errors import ProgressMismatchError, RankingsError, RankingsMismatchError
from .evaluation import MAX_NEW_TOKENS
from .files import atomic_write, bytes_digest
from .localization import default_top_heads, score_heads
from .models import VLM
from .rankings.store import existing_dir
from .tasks import N_NEGATIVES, TASKS, TaskItem


@dataclass(frozen=True)
class RankParams:
    utility: str = "metric"
    top_heads: int | None = None      # None: default_top_heads(L, H)
    top_ratio: float = 0.01
    limit: int | None = None
    seed: int = 0
    n_negatives: int = N_NEGATIVES
    batch_size: int = 32
    compat: str = "ours"              # models.VLM: "official" reproduces the official release's inputs
    preset: str | None = None         # presets.PRESETS name the values came from (recorded only)


class Progress:
    """Partial results of one rank run, on disk."""

    def __init__(self, out: Path, fingerprint: str, *, write: bool = True, data_file: str = ""):
        self.dir = out / ".progress"
        self.data_file = data_file      # recorded with the discovery statistics
        self.fingerprint = fingerprint
        self.write = write              # False in every process but the main one
        state_file = self.dir / "state.json"
        if state_file.exists():
            state = json.loads(state_file.read_text())
            if state["fingerprint"] != fingerprint:
                raise ProgressMismatchError(
                    f"{out} holds progress of a rank run with other arguments ({state['arguments']}); "
                    f"rerun with those arguments to continue, or delete {self.dir} to start over", path=self.dir)
            self.state = state
        else:
            self.state = {"fingerprint": fingerprint, "arguments": "", "tasks": {}}

    def task(self, task: str) -> dict:
        return self.state["tasks"].setdefault(task, {"base": None, "heads": {}, "plans": []})

    def save(self, arguments: str) -> None:
        self.state["arguments"] = arguments
        if self.write:
            atomic_write(self.dir / "state.json", json.dumps(self.state).encode())

    def save_sums(self, task: str, index: int, sums: Sums) -> None:
        if not self.write:
            return
        tensors = {"contributions": sums.contributions.contiguous(), "abs_activation": sums.abs_activation.contiguous()}
        metadata = {"n": str(sums.n)}
        if sums.has_token_stats:
            tensors.update(positive=sums.positive.contiguous(), activation_sum=sums.activation_sum.contiguous())
            metadata["tokens"] = str(sums.tokens)
        atomic_write(self.dir / f"{task}-sums-{index}.safetensors", save(tensors, metadata=metadata))

    def load_sums(self, task: str) -> dict[int, Sums]:
        """Saved sums by plan index; token statistics are None where the file has none (older runs)."""
        out = {}
        for index in self.task(task)["plans"]:
            with safe_open(str(self.dir / f"{task}-sums-{index}.safetensors"), "pt") as f:
                keys, meta = set(f.keys()), f.metadata()
                stats = {"positive", "activation_sum"} <= keys and "tokens" in meta
                out[index] = Sums(f.get_tensor("contributions"), f.get_tensor("abs_activation"), int(meta["n"]),
                                  f.get_tensor("positive") if stats else None,
                                  f.get_tensor("activation_sum") if stats else None,
                                  int(meta["tokens"]) if stats else 0)
        return out

    def save_stats(self, task: str, sums: dict[str, torch.Tensor]) -> None:
        if self.write:
            atomic_write(self.dir / f"{task}-stats.safetensors", save({k: v.contiguous() for k, v in sums.items()}))

    def load_stats(self, task: str) -> dict[str, torch.Tensor] | None:
        """The saved activation sums of `task`'s discovery statistics, or None if not done yet."""
        if not self.task(task).get("stats"):
            return None
        with safe_open(str(self.dir / f"{task}-stats.safetensors"), "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}


def fingerprint(vlm: VLM, data_file: str, tasks: Sequence[str], params: RankParams) -> tuple[str, str]:
    arguments = json.dumps({"model": vlm.name, "revision": vlm.revision, "data": str(Path(data_file).resolve()),
                            "tasks": list(tasks), **asdict(params)}, sort_keys=True)
    return bytes_digest(arguments.encode(), length=16), arguments


def rank_task(vlm: VLM, items: Sequence[TaskItem], params: RankParams, progress: Progress, arguments: str,
              *, show_progress: bool = True, shard: Shard = Shard()) -> rankings.TaskRanking:
    task = items[0].task
    state = progress.task(task)
    arch = vlm.arch

    def layer_done(layer: int, scores: list[float]) -> None:
        state["heads"][str(layer)] = scores
        progress.save(arguments)

    if state["base"] is None:
        head_scores = score_heads(vlm, items, utility=params.utility, batch_size=params.batch_size,
                                  on_layer=layer_done, progress=show_progress, shard=shard)
        state["base"] = head_scores.base
    else:
        done = {int(layer): scores for layer, scores in state["heads"].items()}
        head_scores = score_heads(vlm, items, utility=params.utility, batch_size=params.batch_size, done=done,
                                  base=state["base"], on_layer=layer_done, progress=show_progress, shard=shard)
    progress.save(arguments)
    k = params.top_heads or default_top_heads(arch.num_layers, arch.num_heads)
    top = head_scores.top(k)

    def plan_done(index: int, sums: Sums) -> None:
        progress.save_sums(task, index, sums)
        if index not in state["plans"]:        # a plan run again (its old sums lacked token statistics)
            state["plans"].append(index)
        progress.save(arguments)

    result = attribute(vlm, items, top, head_scores.scores, batch_size=params.batch_size,
                       done=progress.load_sums(task), on_plan=plan_done, progress=show_progress, shard=shard)
    notes = ("no top head lowered the utility when ablated (all S_h <= 0): importance is the unconditioned DVP"
             if result.fallback else "")
    sums = progress.load_stats(task)
    if sums is None:
        sums = activation_sums(vlm, items, batch_size=params.batch_size, progress=show_progress, shard=shard)
        progress.save_stats(task, sums)
        state["stats"] = True
        progress.save(arguments)
    stats = stats_from_sums(sums, len(items), data={"file": Path(progress.data_file).name, "items": len(items)})
    return rankings.TaskRanking(task=task, head_scores=head_scores.scores, importance=result.importance,
                                top_heads=top, baselines=result.baselines, fallback=result.fallback, notes=notes,
                                stats=stats)


def with_ape(results: Mapping[str, rankings.TaskRanking]) -> dict[str, rankings.TaskRanking]:
    """Add the "ape" baseline to every task when all four tasks' AP are there; else a note saying why.

    APE is computed from the stored float32 AP matrices, so it can be recomputed from the artifact.
    """
    missing = [t for t in TASKS if t not in results or "ap" not in results[t].baselines]
    if not missing:
        scores = ape_scores({t: results[t].baselines["ap"] for t in TASKS})
        return {t: replace(r, baselines={**r.baselines, "ape": scores[t]}) for t, r in results.items()}
    note = (f"APE not computed: it compares the activation probabilities (AP) of all {len(TASKS)} tasks "
            f"({', '.join(TASKS)}) from one rank run (--task all); missing here: {', '.join(missing)}.")
    return {t: replace(r, notes=f"{r.notes} {note}".strip()) for t, r in results.items()}


def image_digests(task_items: dict[str, Sequence[TaskItem]]) -> dict[str, str]:
    """{image path: sha256 (16 hex digits) of the file} for every distinct image of the items, each
    read once: what `mask-eval` compares a held-out split with (the manifest keeps the sorted
    digests), so discovery images cannot be evaluated on by mistake."""
    paths = sorted({str(item.image_path) for items in task_items.values() for item in items})
    return {p: bytes_digest(Path(p).read_bytes(), length=16) for p in paths}


def rank(vlm: VLM, task_items: dict[str, Sequence[TaskItem]], out: str | Path, *, data_file: str,
         params: RankParams = RankParams(), show_progress: bool = True, shard: Shard = Shard()) -> rankings.Rankings:
    """Rank heads and neurons for every task of `task_items`; write the artifact to `out`.

    With several processes, call it in every process with the same arguments and its own
    `shard`; all return the same artifact and the main process writes it.
    """
    out = Path(out)
    key, arguments = fingerprint(vlm, data_file, list(task_items), params)
    progress = Progress(out, key, write=shard.is_main, data_file=data_file)
    results = {}
    for task, items in task_items.items():
        results[task] = rank_task(vlm, items, params, progress, arguments,
                                  show_progress=show_progress and shard.is_main, shard=shard)
    results = with_ape(results)
    model = rankings.ModelInfo.from_arch(vlm.arch, id=vlm.name, revision=vlm.revision)
    artifact = rankings.Rankings(
        model=model, tasks=results,
        params={**asdict(params), "max_new_tokens": MAX_NEW_TOKENS,
                "top_heads": params.top_heads or default_top_heads(vlm.arch.num_layers, vlm.arch.num_heads)},
        data={"file": Path(data_file).name, "items": {t: len(i) for t, i in task_items.items()},
              "image_digests": sorted(set(image_digests(task_items).values()))},
        created_with=f"hones_core {__version__}")
    if shard.is_main:
        rankings.save(artifact, out)
        shutil.rmtree(progress.dir)
    shard.barrier()                      # every process returns once the artifact is on disk
    return artifact


def check_discovery_split(artifact: rankings.Rankings, task_items: Mapping[str, Sequence[TaskItem]],
                          digests: Mapping[str, str], *, data_file: str) -> None:
    """Refuse a split other than the one the artifact was ranked on.

    Each task must have as many items as the manifest records, and its images' content digests
    must be among the manifest's; with every task of the artifact given, the two digest sets must
    be equal.

    Args:
        digests: {image path: digest} of the items' images (`image_digests`).

    Raises:
        RankingsMismatchError: another split (the message says what differs).
        RankingsError: the artifact records no digests or counts to compare with.
    """
    recorded = artifact.data.get("image_digests")
    counts = artifact.data.get("items")
    if not recorded or not isinstance(counts, dict):
        raise RankingsError(f"the rankings' manifest records no discovery image digests or item counts (data: "
                            f"{sorted(artifact.data)}), so {data_file} cannot be checked against the split they "
                            "were ranked on; re-rank with this hones_core (`rank` stores the statistics itself)")
    recorded = set(recorded)
    problems = []
    for task, items in task_items.items():
        if counts.get(task) != len(items):
            problems.append(f"{task}: {len(items)} items here, {counts.get(task)} when ranked")
        foreign = {digests[str(item.image_path)] for item in items} - recorded
        if foreign:
            problems.append(f"{task}: {len(foreign)} image(s) that are not in the discovery split")
    given = {digests[str(item.image_path)] for items in task_items.values() for item in items}
    if set(task_items) >= set(artifact.tasks) and given != recorded:
        problems.append(f"{len(recorded - given)} discovery image(s) missing here")
    if problems:
        raise RankingsMismatchError(
            f"{data_file} is not the split these rankings were computed on ({artifact.data.get('file')}; images "
            f"compared by content digest): {'; '.join(problems)} — pass the discovery split with the --limit, "
            f"--seed and --n-negatives the rank run used (its manifest's params)")


def add_stats(vlm: VLM, task_items: Mapping[str, Sequence[TaskItem]], rankings_dir: str | Path, *, data_file: str,
              batch_size: int = 32, show_progress: bool = True,
              shard: Shard = Shard()) -> dict[str, rankings.NeuronStats]:
    """Compute the discovery statistics of an existing artifact's tasks and store them (no re-ranking).

    Args:
        task_items: the discovery items of each task to add statistics for (the split `rank` used).
        rankings_dir: a local artifact folder.

    Returns:
        task -> its `NeuronStats`, as stored.

    Raises:
        RankingsNotFoundError, RankingsSchemaError: no valid artifact at `rankings_dir`.
        RankingsMismatchError: the model or the split is not the one the artifact was made with.
    """
    artifact = rankings.load(existing_dir(Path(rankings_dir)))
    rankings.check_against(artifact, vlm.arch, model_id=vlm.name, revision=vlm.revision)
    for task in task_items:
        artifact.task(task)
    check_discovery_split(artifact, task_items, image_digests(task_items), data_file=data_file)
    out = {}
    for task, items in task_items.items():
        sums = activation_sums(vlm, items, batch_size=batch_size, progress=show_progress and shard.is_main,
                               shard=shard)
        out[task] = stats_from_sums(sums, len(items), data={"file": Path(data_file).name, "items": len(items)})
    if shard.is_main:
        rankings.save_stats(rankings_dir, out)
    shard.barrier()
    return out
