"""The rank run end to end on the toy VLM: artifact contents, and resuming after a kill."""

import json

import pytest
import torch

from hones_core import rankings
from hones_core.pipeline import ProgressMismatchError, RankParams, rank


class Killed(Exception):
    pass


def _rank(vlm, items, out, params, **kwargs):
    return rank(vlm, {"vqa": items}, out, data_file="toy.json", params=params, show_progress=False, **kwargs)


def test_rank_writes_an_artifact_and_a_killed_run_resumes_to_the_same_one(toy_vlm, toy_items, tmp_path,
                                                                          monkeypatch):
    items = toy_items("vqa")[:6]
    params = RankParams(utility="logprob", top_heads=3, batch_size=8)
    whole = _rank(toy_vlm, items, tmp_path / "whole", params)
    ranking = whole.tasks["vqa"]
    assert ranking.head_scores.shape == (toy_vlm.arch.num_layers, toy_vlm.arch.num_heads)
    assert len(ranking.top_heads) == 3
    loaded = rankings.load(tmp_path / "whole")
    assert torch.equal(loaded.tasks["vqa"].importance, ranking.importance)
    assert not (tmp_path / "whole" / ".progress").exists()

    # kill the run right after the second DVP pass's sums are written, before it is recorded
    import hones_core.pipeline as pipeline
    original = pipeline.Progress.save_sums
    calls = {"n": 0}

    def dying(self, task, index, sums):
        original(self, task, index, sums)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed()
    monkeypatch.setattr(pipeline.Progress, "save_sums", dying)
    with pytest.raises(Killed):
        _rank(toy_vlm, items, tmp_path / "resumed", params)
    state = json.loads((tmp_path / "resumed" / ".progress" / "state.json").read_text())
    assert len(state["tasks"]["vqa"]["heads"]) == toy_vlm.arch.num_layers and len(state["tasks"]["vqa"]["plans"]) == 1
    monkeypatch.setattr(pipeline.Progress, "save_sums", original)

    with pytest.raises(ProgressMismatchError, match="other arguments"):
        _rank(toy_vlm, items, tmp_path / "resumed", RankParams(utility="logprob", top_heads=2, batch_size=8))
    resumed = _rank(toy_vlm, items, tmp_path / "resumed", params)
    # bitwise: saved progress round-trips exactly (JSON floats, float64 safetensors) and the rest of the
    # run computes the very same batches as the whole run did
    for name in ("head_scores", "importance"):
        assert torch.equal(getattr(resumed.tasks["vqa"], name), getattr(ranking, name))
    assert torch.equal(resumed.tasks["vqa"].baselines["dvp"], ranking.baselines["dvp"])
    for file in ("vqa/heads.safetensors", "vqa/neurons.safetensors", "vqa/top.json"):
        assert (tmp_path / "resumed" / file).read_bytes() == (tmp_path / "whole" / file).read_bytes()
