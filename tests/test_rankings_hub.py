"""Rankings artifacts and the Hub (a local stand-in server): load, push, download errors, the CLI push."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hones_core import rankings as R
from hones_core.rankings import RankingsNotFoundError, RankingsSchemaError

from conftest import all_files, assert_same, make_rankings, make_task
from hub_server import patch_client, start_hub


# --------------------------------------------------------------------------- load: folder or repo id


def test_not_found_paths(tmp_path):
    with pytest.raises(RankingsNotFoundError, match=r"no rankings folder at .*nope.*not a Hub repo id"):
        R.load(tmp_path / "nope")
    with pytest.raises(RankingsNotFoundError, match="not a Hub repo id"):
        R.load("runs/a/b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RankingsNotFoundError, match="is a file"):
        R.load(tmp_path / "file")


# --------------------------------------------------------------------------- Hub (local server)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    url, store, stop = start_hub()
    patch_client(monkeypatch, url, tmp_home=tmp_path / "hf-home")
    yield SimpleNamespace(url=url, store=store, stop=stop, cache=tmp_path / "hub-cache")
    stop()
    assert store.unhandled == []   # the client asked for nothing the server does not speak
    assert all(not path.startswith("http") for _, path in store.requests)


def test_push_then_load_from_the_hub(tmp_path, hub):
    artifact = make_rankings("vqa", "caption")
    folder = R.save(artifact, tmp_path / "art", figures={"figures/a.png": "A"})
    (folder / "figures").mkdir()
    (folder / "figures" / "a.png").write_bytes(b"\x89PNG fake")
    (folder / ".progress").mkdir()                       # leftovers a push must not upload
    (folder / ".progress" / "state.json").write_text("{}")
    (folder / "ocr").mkdir()                             # a task folder the manifest does not list
    (folder / "ocr" / "top.json").write_text("{}")
    first = R.push(folder, "org/hones-llava")
    assert first.oid and first.endswith(f"/datasets/org/hones-llava/commit/{first.oid}")
    files = hub.store.files("org/hones-llava")
    assert set(files) == {".gitattributes", "figures/a.png", *all_files(folder)} - {".progress/state.json",
                                                                                   "ocr/top.json"}
    assert files["vqa/neurons.safetensors"] == (folder / "vqa" / "neurons.safetensors").read_bytes()

    loaded = R.load("org/hones-llava", cache_dir=hub.cache)
    assert_same(artifact, loaded)
    downloaded = [path for method, path in hub.store.requests if method == "GET" and "/resolve/" in path]
    assert any(path.endswith("/vqa/neurons.safetensors") for path in downloaded)

    # A second commit adds a task; the first stays reachable by its sha.
    R.save_task(folder, make_task("ocr", seed=9))
    second = R.push(folder, "org/hones-llava", commit_message="add ocr")
    assert second.oid != first.oid and hub.store.repos["org/hones-llava"].messages[second.oid] == "add ocr"
    assert list(R.load("org/hones-llava", cache_dir=hub.cache).tasks) == ["vqa", "caption", "ocr"]
    pinned = R.load("org/hones-llava", revision=first.oid, cache_dir=hub.cache)
    assert_same(artifact, pinned)

    # Pushing the same folder again changes nothing and makes no commit.
    third = R.push(folder, "org/hones-llava")
    assert third.oid == second.oid

    # A branch, with one more task than main.
    R.save_task(folder, make_task("retrieval", seed=10))
    R.push(folder, "org/hones-llava", revision="experiments")
    assert list(R.load("org/hones-llava", revision="experiments", cache_dir=hub.cache).tasks) == [
        "vqa", "caption", "ocr", "retrieval"]
    assert list(R.load("org/hones-llava", cache_dir=hub.cache).tasks) == ["vqa", "caption", "ocr"]

    with pytest.raises(RankingsNotFoundError, match="no Hub dataset repo org/missing .*HF_TOKEN"):
        R.load("org/missing", cache_dir=hub.cache)
    with pytest.raises(RankingsNotFoundError, match="has no revision 'v9'"):
        R.load("org/hones-llava", revision="v9", cache_dir=hub.cache)

    # Offline: the server is gone, the cache answers; what was never downloaded fails clearly.
    hub.stop()
    from huggingface_hub import constants
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        assert list(R.load("org/hones-llava", cache_dir=hub.cache).tasks) == ["vqa", "caption", "ocr"]
        assert_same(artifact, R.load("org/hones-llava", revision=first.oid, cache_dir=hub.cache))
        with pytest.raises(RankingsNotFoundError, match=r"org/other is no local folder, and not in the Hub cache while offline mode is on"):
            R.load("org/other", cache_dir=hub.cache)
    # Online but unreachable, and not cached.
    with pytest.raises(RankingsNotFoundError, match="org/other is no local folder, and could not reach the Hub at http://127.0.0.1"):
        R.load("org/other", cache_dir=hub.cache)


def test_private_repo_needs_a_token(tmp_path, hub):
    hub.store.token = "hf_test_token"
    folder = R.save(make_rankings("vqa"), tmp_path / "art")
    R.push(folder, "org/private-ranks", token="hf_test_token", private=True)
    assert hub.store.repos["org/private-ranks"].private
    with pytest.raises(RankingsNotFoundError, match="private repo set HF_TOKEN"):
        R.load("org/private-ranks", cache_dir=hub.cache)
    assert list(R.load("org/private-ranks", cache_dir=hub.cache, token="hf_test_token").tasks) == ["vqa"]


def test_partial_snapshot_is_refused(tmp_path, hub):
    folder = R.save(make_rankings("vqa", "caption"), tmp_path / "art")
    repo = hub.store.create("org/partial")
    files = {name: (folder / name).read_bytes() for name in all_files(folder) if name != "caption/top.json"}
    repo.commit("main", files, "upload without caption/top.json")
    with pytest.raises(RankingsSchemaError, match=r"org/partial is incomplete: .*caption/top.json"):
        R.load("org/partial", cache_dir=hub.cache)


def test_push_refuses_an_invalid_folder(tmp_path, hub):
    folder = R.save(make_rankings("vqa"), tmp_path / "art")
    (folder / "vqa" / "top.json").unlink()
    with pytest.raises(RankingsSchemaError, match="vqa/top.json"):
        R.push(folder, "org/x")
    with pytest.raises(RankingsNotFoundError, match="no rankings folder"):
        R.push(tmp_path / "absent", "org/x")
    assert "org/x" not in hub.store.repos


def test_cli_push_draws_the_card_figures(tmp_path, hub):
    from hones_core.cli import main

    folder = R.save(make_rankings("vqa", "ocr"), tmp_path / "art")
    assert main(["push", "--rankings", str(folder), "--repo-id", "org/with-figures"]) in (0, None)
    files = hub.store.files("org/with-figures")
    expected = {"figures/heads-vqa.png", "figures/heads-ocr.png", "figures/layers.png"}
    assert expected <= set(files)
    for name in expected:
        assert files[name].startswith(b"\x89PNG") and len(files[name]) > 2000
    card = files["README.md"].decode()
    for name in expected:
        assert f"]({name})" in card
    assert "Head scores S(l,h) for ocr" in card
    assert R.load("org/with-figures", cache_dir=hub.cache).tasks.keys() == {"vqa", "ocr"}


def test_discovery_stats_travel_through_the_hub(tmp_path, hub):
    import torch

    artifact = make_rankings("vqa", "caption")
    L, I = artifact.tasks["vqa"].importance.shape
    g = torch.Generator().manual_seed(1)
    artifact.tasks["vqa"].stats = R.NeuronStats(mean=torch.randn(L, I, generator=g), std=torch.rand(L, I, generator=g),
                                                mean_abs=torch.rand(L, I, generator=g),
                                                positive=torch.rand(L, I, generator=g), items=5, data={"file": "d"})
    R.push(R.save(artifact, tmp_path / "art"), "org/with-stats")
    assert "vqa/stats.safetensors" in hub.store.files("org/with-stats")
    loaded = R.load("org/with-stats", cache_dir=hub.cache)
    got = loaded.task("vqa").stats
    assert torch.equal(got.mean, artifact.tasks["vqa"].stats.mean) and (got.items, got.data) == (5, {"file": "d"})
    assert loaded.task("caption").stats is None
