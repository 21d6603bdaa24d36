"""The facade the app calls (`hones_core.demo.service`): neuron sets, loading, concurrency, single flight."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hones_core import rankings
from hones_core.demo import DemoConfigError, DemoService
from hones_core.tasks import TASKS

from conftest import ASSETS, InsideCalls, demo_request as _request


def test_neuron_sets(demo_service, examples, app_rankings, tmp_path):
    keys = [k for _, k in demo_service.methods("vqa")]
    assert keys[0] == "hones" and "random" in keys and "learned" in keys   # the bundled artifact has scales
    bare = rankings.load(app_rankings)
    bare.tasks["vqa"].scales = None
    assert "learned" not in [k for _, k in DemoService(demo_service.vlm, bare).methods("vqa")]
    hones, rand = demo_service.selection("vqa", "hones", 2.0), demo_service.selection("vqa", "random", 2.0)
    assert {l: len(v) for l, v in hones.items()} == {l: len(v) for l, v in rand.items()} and hones != rand
    # learned scales appear when the artifact has them, and scale z by (1 + s) * factor
    artifact = rankings.load(app_rankings)
    scales = rankings.Scales(layers=[0, 1], neurons=[3, 5], scale=[0.5, -1.0], meta={"method": "test"})
    artifact.tasks["vqa"].scales = scales
    service = DemoService(demo_service.vlm, artifact)
    assert "learned" in [k for _, k in service.methods("vqa")]
    request = _request(service, examples["vqa"][0], method="learned", factor=2.0)
    plan = service.plan(request)
    assert [(e.layer, e.neurons, e.factor) for e in plan.neurons] == [(0, (3,), (3.0,)), (1, (5,), (0.0,))]
    assert service.run(request).results["neuron_set"] == "learned"


def test_mismatched_rankings_refuse_to_load(app_rankings, tmp_path):
    """Rankings of a model with one more layer stop start-up with a message naming both sides."""
    from dataclasses import replace

    artifact = rankings.load(app_rankings)
    grown = {task: rankings.TaskRanking(task, torch.cat([r.head_scores, r.head_scores[:1]]),
                                        torch.cat([r.importance, r.importance[:1]]), r.top_heads)
             for task, r in artifact.tasks.items()}
    layers = artifact.model.num_layers
    other = rankings.Rankings(model=replace(artifact.model, num_layers=layers + 1, id="bigger-model"), tasks=grown)
    rankings.save(other, tmp_path / "other")
    with pytest.raises(DemoConfigError, match=f"made for {layers + 1} layers \\(bigger-model\\).*has {layers}"):
        DemoService.load(str(ASSETS / "toy-vlm"), str(tmp_path / "other"), device="cpu")
    with pytest.raises(DemoConfigError, match="HONES_RANKINGS=.*no rankings folder"):
        DemoService.load(str(ASSETS / "toy-vlm"), str(tmp_path / "nowhere" / "x" / "y"), device="cpu")


def test_concurrent_requests_match_sequential(demo_service, examples):
    """16 requests with different tasks and factors in threads give their sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [(examples[t][i % 2], f) for i, (t, f) in enumerate(
        (t, f) for t in TASKS for f in (0.0, 0.5, 2.0, 3.0))]
    assert len(cases) == 16
    requests = [_request(demo_service, e, factor=f) for e, f in cases]
    sequential = [demo_service.compute(r) for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(demo_service.compute, requests))
    for s, p in zip(sequential, parallel):
        assert s.base.answers == p.base.answers and s.steered.answers == p.steered.answers
        assert s.base.margins == pytest.approx(p.base.margins, abs=1e-5)
        assert s.steered.margins == pytest.approx(p.steered.margins, abs=1e-5)
        assert math.isclose(float(np.abs(s.steered.contributions - p.steered.contributions).max()), 0, abs_tol=1e-5)


def test_model_work_of_run_and_sweep_goes_through_the_given_functions(toy_vlm, app_rankings, examples):
    """What ZeroGPU needs: every model call of run and sweep happens inside the functions the caller passes."""
    service = DemoService(toy_vlm, rankings.load(app_rankings))
    calls = InsideCalls()
    handle = calls.watch(toy_vlm)
    try:
        for task in ("caption", "vqa", "retrieval"):
            request = _request(service, examples[task][1], factor=0.5)
            # a sweep for an input never run before: the base answer is computed first
            service.sweep(request, compute=calls.wrap(service.compute), compute_sweep=calls.wrap(service.compute_sweep))
            service.run(_request(service, examples[task][1], factor=2.0), compute=calls.wrap(service.compute))
    finally:
        handle.remove()
    assert calls.inside > 0 and calls.outside == 0, vars(calls)


def test_the_same_request_twice_computes_once(toy_vlm, app_rankings, examples, monkeypatch):
    """Typing a factor and clicking Run sends the request twice (blur, click): one computation."""
    service = DemoService(toy_vlm, rankings.load(app_rankings))
    runs = []
    original = service.compute
    monkeypatch.setattr(service, "compute", lambda *a, **k: runs.append(1) or original(*a, **k))
    example = examples["vqa"][0]
    first = service.run(_request(service, example, factor=0.5))
    again = service.run(_request(service, example, factor=0.5))
    assert len(runs) == 1 and again.summary == first.summary and "from the cache" not in first.summary
    service.run(_request(service, example, factor=0.75))
    assert len(runs) == 2
    # the two events of one action arrive together: the second waits for the first's output
    import threading
    import time

    def slow(*args, **kwargs):
        runs.append(1)
        time.sleep(0.3)
        return original(*args, **kwargs)
    monkeypatch.setattr(service, "compute", slow)
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(service.run(_request(service, example, factor=1.5))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 3 and len(outs) == 3 and outs[0] is outs[1] is outs[2]


def test_devices_that_are_not_there_are_refused():
    from hones_core.demo import check_device

    check_device(None)
    check_device("cpu")
    with pytest.raises(DemoConfigError, match="is not a device name"):
        check_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(DemoConfigError, match="no CUDA device.*HONES_DEVICE=cpu"):
            check_device("cuda")


def test_rankings_of_another_hub_model_are_refused_unless_allowed(toy_vlm, app_rankings, examples):
    """The same toy weights under a fine-tune's Hub name: same shapes, another model."""
    from dataclasses import replace

    from hones_core.errors import RankingsMismatchError
    from hones_core.models import VLM

    artifact = rankings.load(app_rankings)
    artifact.model = replace(artifact.model, id="org/toy-base", revision=None)
    tuned = VLM(toy_vlm.model, toy_vlm.processor, name="org/toy-finetune")
    with pytest.raises(RankingsMismatchError, match="computed for org/toy-base, and the model loaded is "
                                                    "org/toy-finetune"):
        DemoService(tuned, artifact)
    service = DemoService(tuned, artifact, allow_other_model=True)
    out = service.run(_request(service, examples["vqa"][0]))
    assert out.results["rankings"]["other_model"].startswith("the rankings were computed for org/toy-base")
    assert any(w.startswith("Allowed with --allow-other-model: the rankings were computed for org/toy-base")
               for w in out.warnings)
    # the matching model is not flagged
    assert DemoService(toy_vlm, rankings.load(app_rankings)).other_model is None
