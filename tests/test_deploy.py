"""`python -m hones_core deploy` against the local Hub stand-in: real huggingface_hub calls, no mocks."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hones_core.assets import REPO_ROOT
from hones_core.cli import main
from hones_core.errors import DeployError, HonesError

from hub_server import GITATTRIBUTES, patch_client, start_hub

TOKEN = "hf_deploy_token"
TOY = ["--model", "assets/toy-vlm", "--rankings", "assets/rankings/toy-vlm"]
HUB = ["--model", "org/smolvlm", "--rankings", "you/hones-rankings"]
MODEL_FILES = {"config.json": b'{"model_type": "smolvlm"}', "model.safetensors": b"weights",
               "tokenizer.json": b"{}"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    url, store, stop = start_hub()
    patch_client(monkeypatch, url, tmp_home=tmp_path / "hf-home")
    store.token = TOKEN                      # Space writes need it, as on the Hub
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.chdir(REPO_ROOT)             # the README's commands run from the repository root
    model = store.create("org/smolvlm", repo_type="model")
    model.commit("main", {".gitattributes": GITATTRIBUTES, **MODEL_FILES}, "upload model")
    store.create("you/hones-rankings").commit("main", {"manifest.json": b"{}"}, "upload rankings")
    yield SimpleNamespace(url=url, store=store)
    stop()
    assert store.unhandled == []             # the client asked for nothing the stand-in does not speak
    assert all(not path.startswith("http") for _, path in store.requests)


def deploy(capsys, *args: str) -> dict:
    """Run the CLI; return its one JSON line."""
    assert main(["deploy", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def expected_files(*folders: str) -> dict[str, bytes]:
    """The app files, listed by walking the checkout (not with deploy's own helper)."""
    out = {"app.py": (REPO_ROOT / "app.py").read_bytes()}
    for folder in ("hones_core", "assets/examples", *folders):
        for dirpath, dirnames, filenames in os.walk(REPO_ROOT / folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            for name in filenames:
                if name.endswith((".pyc", ".pyi")) or name.startswith("."):
                    continue
                path = Path(dirpath) / name
                out[path.relative_to(REPO_ROOT).as_posix()] = path.read_bytes()
    return out


def front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])


def requirement_names(data: bytes) -> list[str]:
    return [line.split("=")[0].split(">")[0].split("<")[0].strip().lower() for line in data.decode().splitlines()]


# --------------------------------------------------------------------------- the bundled toy, then a Hub model


def test_toy_then_rerun_then_hub_model(hub, capsys):
    store = hub.store
    first = deploy(capsys, "--space-id", "you/hones", *TOY)
    assert first["url"] == f"{hub.url}/spaces/you/hones"
    space = store.spaces["you/hones"]
    assert space.sdk == "gradio" and not space.private
    files = store.files("you/hones", repo_type="space")

    # Exactly the app files, byte for byte, with the bundled model and rankings; no caches, no tests.
    app = expected_files("assets/toy-vlm", "assets/rankings/toy-vlm")
    assert set(files) == {".gitattributes", "README.md", "requirements.txt", *app}
    assert all(files[name] == data for name, data in app.items())
    assert not any("__pycache__" in name or name.startswith(("tests/", "benchmarks/", "docs/")) for name in files)
    assert "hones_core/deploy.py" in files and "assets/toy-vlm/model.safetensors" in files
    assert first["commit"] == space.branches["main"] and first["files"] == len(files) - 1

    meta = front_matter(files["README.md"])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == importlib.metadata.version("gradio")
    assert meta["title"] == "HONES Space"
    assert "preload_from_hub" not in meta and "models" not in meta   # nothing to download: it is bundled
    names = requirement_names(files["requirements.txt"])
    assert "torch" in names and "transformers" in names
    assert not {"gradio", "pytest", "playwright", "spaces"} & set(names)
    assert space.variables == {}             # unset, the app serves the bundled toy
    assert first["variables_set"] == {} and first["hardware"] is None

    # The same deploy again: no commit, no variable written.
    commits, posts = len(space.commits), len(store.requests)
    again = deploy(capsys, "--space-id", "you/hones", *TOY)
    assert again["commit"] is None and again["uploaded"] == 0 and again["deleted"] == []
    assert len(space.commits) == commits
    assert not [r for r in store.requests[posts:] if r[0] in ("PUT", "DELETE")
                or (r[0] == "POST" and r[1] != "/api/repos/create")]

    # Now a Hub model with its Hub rankings, pinned: the toy assets leave the Space.
    hub_run = deploy(capsys, "--space-id", "you/hones", *HUB, "--revision", "main")
    files = store.files("you/hones", repo_type="space")
    app = expected_files()
    assert set(files) == {".gitattributes", "README.md", "requirements.txt", *app}
    assert not any(name.startswith(("assets/toy-vlm/", "assets/rankings/")) for name in files)
    assert sorted(hub_run["deleted"]) == sorted(n for n in expected_files("assets/toy-vlm", "assets/rankings/toy-vlm")
                                                if n.startswith(("assets/toy-vlm/", "assets/rankings/")))
    assert space.variables == {"HONES_MODEL": "org/smolvlm", "HONES_RANKINGS": "you/hones-rankings",
                               "HONES_REVISION": "main"}
    meta = front_matter(files["README.md"])
    pinned = store.models["org/smolvlm"].branches["main"]
    assert meta["preload_from_hub"] == [f"org/smolvlm config.json,model.safetensors,tokenizer.json {pinned}"]
    assert meta["models"] == ["org/smolvlm"] and meta["datasets"] == ["you/hones-rankings"]
    assert hub_run["preload_from_hub"] == meta["preload_from_hub"]

    # Unpinned: HONES_REVISION is deleted, the model preloaded at its default branch.
    unpinned = deploy(capsys, "--space-id", "you/hones", *HUB)
    assert unpinned["variables_deleted"] == ["HONES_REVISION"] and unpinned["variables_set"] == {}
    assert space.variables == {"HONES_MODEL": "org/smolvlm", "HONES_RANKINGS": "you/hones-rankings"}
    assert front_matter(store.files("you/hones", repo_type="space")["README.md"])["preload_from_hub"] == [
        "org/smolvlm"]


def test_separate_revisions(hub, capsys):
    model = hub.store.models["org/smolvlm"]
    model.branches["v2"] = model.commit("v2", {"config.json": b"{}", "model.safetensors": b"v2"}, "v2")
    deploy(capsys, "--space-id", "you/pinned", *HUB, "--model-revision", "v2", "--rankings-revision", "main")
    space = hub.store.spaces["you/pinned"]
    assert space.variables == {"HONES_MODEL": "org/smolvlm", "HONES_RANKINGS": "you/hones-rankings",
                               "HONES_MODEL_REVISION": "v2", "HONES_RANKINGS_REVISION": "main"}
    meta = front_matter(hub.store.files("you/pinned", repo_type="space")["README.md"])
    assert meta["preload_from_hub"] == [f"org/smolvlm config.json,model.safetensors {model.branches['v2']}"]


# --------------------------------------------------------------------------- private, hardware


def test_private_is_honoured(hub, capsys):
    out = deploy(capsys, "--space-id", "you/secret", *TOY, "--private")
    assert out["private"] and hub.store.spaces["you/secret"].private
    # An existing public Space: --private makes it private; without the flag, visibility is left alone.
    deploy(capsys, "--space-id", "you/open", *TOY)
    assert not hub.store.spaces["you/open"].private
    assert deploy(capsys, "--space-id", "you/open", *TOY, "--private")["private"]
    assert hub.store.spaces["you/open"].private
    assert deploy(capsys, "--space-id", "you/open", *TOY)["private"]
    assert hub.store.spaces["you/open"].private


def test_zero_gpu(hub, capsys):
    out = deploy(capsys, "--space-id", "you/zero", *HUB, "--hardware", "zero-a10g")
    space = hub.store.spaces["you/zero"]
    assert space.hardware_requests == ["zero-a10g"] and out["hardware"] == {"requested": "zero-a10g",
                                                                             "granted": True}
    files = hub.store.files("you/zero", repo_type="space")
    assert "spaces" in requirement_names(files["requirements.txt"])
    assert front_matter(files["README.md"])["suggested_hardware"] == "zero-a10g"


def test_refused_hardware_leaves_the_deploy_and_says_what_to_do(hub, capsys):
    hub.store.grantable_hardware = {"cpu-basic"}        # a token without ZeroGPU
    with pytest.raises(DeployError, match=r"refused the request for zero-a10g.*HTTP 403.*Settings.*cpu-basic"):
        main(["deploy", "--space-id", "you/nozero", *HUB, "--hardware", "zero-a10g"])
    summary = json.loads(capsys.readouterr().out)       # the summary is printed before the error
    assert summary["hardware"]["granted"] is False and "403" in summary["hardware"]["error"]
    space = hub.store.spaces["you/nozero"]
    assert space.hardware_requests == [] and space.variables["HONES_MODEL"] == "org/smolvlm"
    assert "app.py" in hub.store.files("you/nozero", repo_type="space")


# --------------------------------------------------------------------------- refused before any request


@pytest.mark.parametrize("args, message", [
    (["--space-id", "no-namespace", *TOY], r"--space-id 'no-namespace' is not a Space id: give it as owner/name"),
    (["--space-id", "you/bad name", *TOY], r"is not a Space id"),
    (["--space-id", "a/b/c", *TOY], r"is not a Space id"),
    (["--space-id", "you/x", *TOY, "--hardware", "t4-small"], r"--hardware 't4-small'.*cpu-basic or zero-a10g"),
    (["--space-id", "you/x", "--model", "org/smolvlm", "--rankings", "assets/rankings/toy-vlm"],
     r"bundled rankings .* computed for the bundled toy VLM, not for org/smolvlm"),
    (["--space-id", "you/x", *TOY, "--revision", "v1"], r"revision was given for the model.*bundled"),
    (["--space-id", "you/x", "--model", "./not/a/folder", "--rankings", "you/hones-rankings"],
     r"--model './not/a/folder' is neither a Hub repo id"),
    (["--space-id", "you/x", "--model", "org/smolvlm", "--rankings", "bad//id"], r"--rankings 'bad//id' is neither"),
])
def test_bad_input_is_refused_before_any_request(hub, args, message):
    with pytest.raises(DeployError, match=message):
        main(["deploy", *args])
    assert hub.store.requests == []


def test_local_folders_are_refused_with_the_push_command(hub, tmp_path):
    (tmp_path / "my-vlm").mkdir()
    (tmp_path / "ranks").mkdir()
    with pytest.raises(DeployError, match=r"--model .*my-vlm is a local folder.*hf upload you/my-vlm"):
        main(["deploy", "--space-id", "you/x", "--model", str(tmp_path / "my-vlm"), "--rankings", "you/r"])
    with pytest.raises(DeployError, match=r"--rankings .*ranks is a local folder.*hones_core push --rankings"):
        main(["deploy", "--space-id", "you/x", "--model", "org/smolvlm", "--rankings", str(tmp_path / "ranks")])
    assert hub.store.requests == []


def test_no_token(hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(DeployError, match=r"no Hugging Face token.*hf auth login.*HF_TOKEN"):
        main(["deploy", "--space-id", "you/x", *TOY])
    assert hub.store.requests == []


def test_cli_exit_code_and_message(hub, capsys):
    """What a user sees: one line on stderr, exit code 2, no traceback."""
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["hones_core", "deploy", "--space-id", "nope", *TOY]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module("hones_core", run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m hones_core: --space-id 'nope' is not a Space id") and "Traceback" not in err


# --------------------------------------------------------------------------- refused by the Hub


def test_unknown_model_or_rankings_leave_no_space(hub):
    with pytest.raises(DeployError, match=r"--model org/missing: no such model on the Hub.*hf upload"):
        main(["deploy", "--space-id", "you/x", "--model", "org/missing", "--rankings", "you/hones-rankings"])
    with pytest.raises(DeployError, match=r"--rankings you/missing: no such rankings dataset.*hones_core push"):
        main(["deploy", "--space-id", "you/x", "--model", "org/smolvlm", "--rankings", "you/missing"])
    with pytest.raises(DeployError, match=r"org/smolvlm has no revision 'v9'"):
        main(["deploy", "--space-id", "you/x", *HUB, "--model-revision", "v9"])
    assert hub.store.spaces == {}
    assert not [r for r in hub.store.requests if r[0] != "GET"]


def test_a_token_without_write_access(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_read_only")
    with pytest.raises(DeployError, match=r"could not create or open the Space you/x: HTTP 401.*write access to you"):
        main(["deploy", "--space-id", "you/x", *TOY])
    assert hub.store.spaces == {}


def test_errors_are_hones_errors():
    assert issubclass(DeployError, HonesError) and issubclass(DeployError, RuntimeError)
    assert DeployError("x", space_id="a/b").space_id == "a/b"


def test_the_uploaded_toy_space_starts_on_its_own(hub, capsys, tmp_path):
    """The Space's files alone (no checkout around them) are enough to start the app's service.

    The files the stand-in holds are written to an empty folder and a fresh interpreter, run
    there with no HONES_* variable, parses the app's arguments, reads the examples and loads
    the bundled model and rankings, the way the Space's `python app.py` starts.
    """
    import subprocess
    import sys

    deploy(capsys, "--space-id", "you/standalone", *TOY)
    space_dir = tmp_path / "space"
    for name, data in hub.store.files("you/standalone", repo_type="space").items():
        (space_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (space_dir / name).write_bytes(data)
    script = ("import app, hones_core, json\n"
              "args = app.parse_args([])\n"
              "examples = app.check_examples(args.examples)\n"
              "service = app.load_service(args)\n"
              "print(json.dumps({'package': hones_core.__file__, 'model': args.model, 'tasks': service.tasks, "
              "'examples': sum(map(len, examples.examples.values()))}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HONES_", "PYTHONPATH"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=space_dir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(out["package"]).resolve().is_relative_to(space_dir.resolve())   # not the checkout's package
    assert Path(out["model"]).resolve() == (space_dir / "assets" / "toy-vlm").resolve()
    assert out["tasks"] == ["vqa", "ocr", "caption", "retrieval"] and out["examples"] > 0
