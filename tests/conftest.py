"""Shared fixtures: tiny models of every family, built offline once per session."""

from __future__ import annotations

import os
from pathlib import Path

# What the tests need, set here so that a plain `pytest` works as README says (before
# huggingface_hub and gradio are imported: both read these at import time). No test reaches
# the network: the Hub tests talk to a local stand-in server.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
from PIL import Image

from hones_core.testing import FAMILIES, build_tiny_vlm


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """`tiny_dir(family)` -> directory of a saved tiny model of that family (built once)."""
    root = tmp_path_factory.mktemp("tiny-vlms")
    built: dict[str, object] = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_vlm(family, root / family)
        return built[family]
    return get


@pytest.fixture(scope="session")
def tiny_vlm(tiny_dir):
    """`tiny_vlm(family)` -> a `VLM` loaded with `load_vlm` from the saved directory (cached)."""
    from hones_core.models import load_vlm

    loaded: dict[str, object] = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = load_vlm(tiny_dir(family), device="cpu")
        return loaded[family]
    return get


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def images():
    """Two small images of different sizes and colours."""
    return [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 50), (10, 200, 10))]



@pytest.fixture(scope="session")
def prompts():
    return ["Describe the image in one sentence.",
            "Question: What color is the circle?\nAnswer the question with a short phrase."]


ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="session")
def toy_vlm():
    """The shipped toy VLM, loaded like any Hub model."""
    from hones_core.models import load_vlm

    return load_vlm(ASSETS / "toy-vlm", device="cpu")


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """Folder of a small fresh split of the synthetic world (a seed never used in training)."""
    from hones_core.toy import world

    out = tmp_path_factory.mktemp("world")
    world.write_world(out, seed=4242, n_discovery=24, n_dev=1, n_test=1, progress=False)
    return out


@pytest.fixture(scope="session")
def toy_records(toy_world):
    """The records of `toy_world`'s discovery split."""
    from hones_core.data import read_records

    return read_records(toy_world / "discovery.json")


@pytest.fixture(scope="session")
def toy_items(toy_records):
    """`toy_items(task)` -> TaskItems of the fresh split."""
    from hones_core.tasks import items_for_task

    return lambda task: items_for_task(task, toy_records, n_negatives=4, seed=0)


@pytest.fixture(scope="session")
def app_rankings():
    """The bundled rankings of the shipped toy VLM (all four tasks, learned scales included)."""
    bundled = ASSETS / "rankings" / "toy-vlm"
    assert (bundled / "manifest.json").is_file(), f"{bundled} is missing: the app's default rankings are part of the repo"
    return bundled


@pytest.fixture(scope="session")
def demo_service(toy_vlm, app_rankings):
    """The app's service on the shipped toy VLM."""
    from hones_core import rankings
    from hones_core.demo import DemoService

    return DemoService(toy_vlm, rankings.load(app_rankings))


@pytest.fixture(scope="session")
def examples(tmp_path_factory):
    """Two synthetic-world examples per task (seed 4242), read back like the app's gallery."""
    from hones_core.demo import read_examples
    from hones_core.toy.examples import write_examples

    out = tmp_path_factory.mktemp("examples")
    write_examples(out, seed=4242, per_task=2)
    return read_examples(out)


def demo_request(service, example, **overrides):
    """`service.request` for an examples.json entry: masked (factor 0), 2 % budget, HONES neurons."""
    fields = dict(task=example["task"], image=example["image"], question=example.get("question"),
                  bbox=example.get("bbox"), candidates=example.get("candidates"), gold=example.get("answer"),
                  factor=0.0, budget_pct=2.0, method="hones")
    fields.update(overrides)
    return service.request(**fields)


class InsideCalls:
    """Counts decoder passes of a model inside and outside the functions wrapped with `wrap`.

    What ZeroGPU needs of the app: every model call runs inside a `spaces.GPU`-wrapped function.
    """

    def __init__(self):
        self.depth, self.inside, self.outside = 0, 0, 0

    def wrap(self, fn):
        def call(*args, **kwargs):
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        call.__name__ = getattr(fn, "__name__", "wrapped")
        return call

    def watch(self, vlm):
        """Hook every decoder pass of `vlm` (layer 0's up projection); returns the handle to remove."""
        def seen(module, args):
            if self.depth:
                self.inside += 1
            else:
                self.outside += 1
        return vlm.arch.layers[0].up_proj.register_forward_pre_hook(seen)


def top2_gap(scores, tokens, stops) -> float:
    """Smallest gap between the two best logits over every row's greedy steps (up to its stop token).

    Greedy tokens of two runs that agree only up to float rounding are the same while this gap
    exceeds twice the rounding: the tests check it before comparing generated text.
    """
    gaps = []
    for row in range(tokens.shape[0]):
        for step, logits in enumerate(scores):
            best = logits[row].topk(2).values
            gaps.append(float(best[0] - best[1]))
            if int(tokens[row, step]) in stops:
                break
    return min(gaps)


# ----- rankings artifacts (tests/test_rankings_*.py) -----------------------------------------------

RANKINGS_SHAPE = (3, 4, 50)   # layers, heads, FFN neurons of the fake model the rankings tests use


def fake_arch(num_layers=RANKINGS_SHAPE[0], num_heads=RANKINGS_SHAPE[1], intermediate_size=RANKINGS_SHAPE[2],
              family="llava"):
    """Just the `Architecture` fields rankings look at."""
    from types import SimpleNamespace

    return SimpleNamespace(family=SimpleNamespace(name=family), num_layers=num_layers, num_heads=num_heads,
                           intermediate_size=intermediate_size)


def make_task(task="vqa", seed=0, *, fallback=False, scales=None):
    """A seeded random `TaskRanking` of RANKINGS_SHAPE with "activation" and "dvp" baselines."""
    import torch

    from hones_core.rankings import TaskRanking

    L, H, I = RANKINGS_SHAPE
    g = torch.Generator().manual_seed(seed)
    return TaskRanking(task=task, head_scores=torch.randn(L, H, generator=g), importance=torch.rand(L, I, generator=g),
                       top_heads=[(2, 1), (0, 3)],
                       baselines={"activation": torch.rand(L, I, generator=g), "dvp": torch.randn(L, I, generator=g)},
                       fallback=fallback, scales=scales, notes=f"notes of {task}")


def make_rankings(*tasks: str):
    """`Rankings` of these tasks (default vqa, caption; caption as a fallback) for a llava-like model."""
    from hones_core.rankings import ModelInfo, Rankings

    tasks = tasks or ("vqa", "caption")
    model = ModelInfo.from_arch(fake_arch(), id="llava-hf/llava-1.5-7b-hf", revision="abc123")
    return Rankings(model=model,
                    tasks={t: make_task(t, seed=i, fallback=(t == "caption")) for i, t in enumerate(tasks)},
                    params={"top_heads": 2, "utility": "metric"}, data={"file": "disc.jsonl", "items": {"vqa": 8}},
                    created_with="hones_core test")


def assert_same(a, b) -> None:
    """Two `Rankings` hold the same model, tasks, tensors, scales and metadata."""
    import torch

    assert a.model == b.model
    assert list(a.tasks) == list(b.tasks)
    assert (a.params, a.data, a.created_with) == (b.params, b.data, b.created_with)
    for name in a.tasks:
        x, y = a.tasks[name], b.tasks[name]
        assert torch.equal(x.head_scores, y.head_scores) and torch.equal(x.importance, y.importance)
        assert x.top_heads == y.top_heads and x.fallback == y.fallback and x.notes == y.notes
        assert list(x.baselines) == list(y.baselines)
        assert all(torch.equal(x.baselines[k], y.baselines[k]) for k in x.baselines)
        assert (x.scales is None) == (y.scales is None)
        if x.scales is not None:
            assert torch.equal(x.scales.layers, y.scales.layers) and torch.equal(x.scales.neurons, y.scales.neurons)
            assert torch.equal(x.scales.scale, y.scales.scale) and x.scales.meta == y.scales.meta


def all_files(root: Path) -> set[str]:
    """Every file under `root`, as POSIX paths relative to it."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
