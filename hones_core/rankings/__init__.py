"""The rankings artifact: head scores and neuron rankings of one model, per task (schema v1).

`save` writes one to a folder, `load` reads one from a folder or a Hub dataset repo (through
the Hub cache, so `HF_HUB_OFFLINE=1` works once downloaded), `check_against` refuses rankings
of another model, `push` uploads, and `import_official` converts the output files of the
official HONES release. What lives where (each module imports only those above it):

    schema.py    the format: file names, `ModelInfo`, `Scales`, `TaskRanking`, `Rankings`,
                 `validate`, `check_against`, `check_task_shapes`
    card.py      the dataset card (`dataset_card`) and the figures an existing card links to
    store.py     local folders: `save`, `save_task`, `save_scales`, `save_stats`, `write_scales`, `read_scales`,
                 `read_dir` (files written atomically, the manifest last)
    hub.py       `load` (a folder or a Hub repo, download errors explained) and `push`
    official.py  `import_official`

Everything is importable from here, as it was from the single module this package replaces.
"""

from __future__ import annotations

# Re-exported because the single `rankings` module offered them (their homes: errors, files, selection).
from ..errors import RankingsError, RankingsMismatchError, RankingsNotFoundError, RankingsSchemaError
from ..files import atomic_write
from ..selection import budget
from .card import dataset_card
from .hub import load, push
from .official import OFFICIAL_FILES, import_official
from .schema import (CARD_FILE, DEFAULT_RATIO, EVALUATION_FILE, HEADS_FILE, MANIFEST, NEURONS_FILE, RESERVED_METHODS,
                     SCALES_FILE, SCHEMA, STATS_FILE, STATS_POSITION, TOP_FILE, ModelInfo, NeuronStats, Rankings,
                     Scales, TaskRanking, check_against, is_hub_id, validate)
from .store import read_scales, save, save_evaluation, save_scales, save_stats, save_task, write_scales

__all__ = [
    # schema
    "SCHEMA", "DEFAULT_RATIO", "RESERVED_METHODS", "MANIFEST", "HEADS_FILE", "NEURONS_FILE", "TOP_FILE",
    "SCALES_FILE", "STATS_FILE", "STATS_POSITION", "CARD_FILE", "EVALUATION_FILE", "ModelInfo", "Scales",
    "NeuronStats", "TaskRanking", "Rankings", "validate", "check_against", "is_hub_id",
    # store, card, hub, official
    "save", "save_task", "save_scales", "save_stats", "save_evaluation", "write_scales", "read_scales",
    "dataset_card", "load", "push", "OFFICIAL_FILES", "import_official",
    # from errors, files, selection
    "RankingsError", "RankingsSchemaError", "RankingsMismatchError", "RankingsNotFoundError", "atomic_write",
    "budget",
]
