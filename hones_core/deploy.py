"""Deploy the app to a Hugging Face Space in one call: `plan` (offline checks) then `deploy`.

`plan` checks every input and gathers what the Space gets without touching the network:
the app files (app.py, the hones_core package, the examples gallery, and the bundled toy
model / rankings only when those are what the Space serves), a requirements.txt made
from the repository's, and a README.md whose front matter configures the Space (gradio
SDK at the installed version, `preload_from_hub` so the model is downloaded while the Space
builds, `suggested_hardware`). `deploy` then checks that the model and rankings repos exist
(and pins their revisions), creates or updates the Space, commits exactly those files
(deleting files an earlier deploy left that are no longer part of the app), sets the HONES_*
variables the app reads (and deletes those no longer wanted), and requests hardware.

Re-running with the same inputs changes nothing (no commit, no variable written); with
other inputs it updates the Space in place.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .assets import DEFAULT_EXAMPLES, DEFAULT_MODEL, DEFAULT_RANKINGS, REPO_ROOT
from .errors import DeployError
from .rankings.hub import transport_errors

HARDWARE = ("cpu-basic", "zero-a10g")
# Every variable the app reads that deploy manages: a later deploy deletes the ones it does
# not set, so a Space never keeps a stale HONES_REVISION from an earlier deploy.
MANAGED_VARIABLES = ("HONES_MODEL", "HONES_RANKINGS", "HONES_REVISION", "HONES_MODEL_REVISION",
                     "HONES_RANKINGS_REVISION")
# Left out of the Space's requirements.txt: gradio is installed by the Space at `sdk_version`
# (a second pin could fight it), the rest only runs the tests.
NOT_FOR_THE_SPACE = ("gradio", "pytest", "playwright")
PYTHON_VERSION = "3.12"      # DESIGN.md section 5; the version the suite runs on
KEPT = ".gitattributes"      # made by the Hub with the repo; never deleted


@dataclass(frozen=True)
class Source:
    """The model or the rankings a Space serves.

    Attributes:
        name: the Hub repo id, or the bundled folder's path relative to the repository.
        bundled: the repository's own toy model / rankings, uploaded with the app.
        revision: branch, tag or commit of the Hub repo (None: its default branch).
    """
    name: str
    bundled: bool
    revision: str | None = None


@dataclass(frozen=True)
class DeployPlan:
    """Everything a deploy writes, computed offline by `plan`.

    Attributes:
        space_id: "owner/name" of the Space.
        model, rankings: what the Space serves.
        files: path in the Space -> local file (a Path) or generated content (bytes).
        variables: the HONES_* variables to set; the other MANAGED_VARIABLES are deleted.
        front_matter: the README's YAML front matter (preload_from_hub is completed by
            `deploy`, which pins revisions to commits).
        hardware: hardware to request (None: leave it as it is).
        private: create the Space private, or make an existing one private.
    """
    space_id: str
    model: Source
    rankings: Source
    files: dict[str, Path | bytes]
    variables: dict[str, str]
    front_matter: dict
    hardware: str | None = None
    private: bool = False


@dataclass
class DeployResult:
    """What `deploy` did (`summary()` is the CLI's JSON line)."""
    space_id: str
    url: str
    commit: str | None                 # the new commit's sha; None when no file changed
    uploaded: list[str]                # paths added or changed by the commit
    deleted: list[str]                 # paths an earlier deploy left, removed by the commit
    variables_set: dict[str, str]
    variables_deleted: list[str]
    private: bool
    preload_from_hub: list[str]
    hardware: dict | None = None       # {"requested", "granted", "error"?}
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"space_id": self.space_id, "url": self.url, "commit": self.commit, "files": len(self.files),
                "uploaded": len(self.uploaded), "deleted": self.deleted, "variables_set": self.variables_set,
                "variables_deleted": self.variables_deleted, "private": self.private,
                "preload_from_hub": self.preload_from_hub, "hardware": self.hardware}


# --------------------------------------------------------------------------- offline: the plan


def plan(*, space_id: str, model: str, rankings: str, revision: str | None = None,
         model_revision: str | None = None, rankings_revision: str | None = None, hardware: str | None = None,
         private: bool = False, root: str | Path = REPO_ROOT) -> DeployPlan:
    """Check the inputs and gather the Space's files and variables, without any network call.

    Args:
        space_id: the Space to create or update, "owner/name".
        model: a Hub model id, or the bundled toy VLM's folder (`assets/toy-vlm`).
        rankings: a Hub dataset repo id, or the bundled toy rankings' folder.
        revision: revision of both Hub repos (HONES_REVISION); the two below override it.
        model_revision, rankings_revision: revision of one repo.
        hardware: "cpu-basic" or "zero-a10g" to request it (and suggest it in the README);
            None leaves the Space's hardware alone.
        private: create the Space private (or make an existing one private).
        root: the repository checkout whose app is deployed.

    Returns:
        The DeployPlan.

    Raises:
        DeployError: a malformed Space id, an unknown hardware, a local model or rankings
            folder other than the bundled ones, a revision given for a bundled folder, the
            bundled rankings with another model, or a `root` that is not a checkout with app.py.
    """
    root = Path(root)
    _check_space_id(space_id)
    if hardware is not None and hardware not in HARDWARE:
        raise DeployError(f"--hardware {hardware!r} is not one this app is made for; choose {' or '.join(HARDWARE)} "
                          f"(cpu-basic: free, fits SmolVLM-256M and the toy model; zero-a10g: ZeroGPU, for 3B/7B "
                          f"models)", space_id=space_id)
    model_src = _source(model, bundled=Path(DEFAULT_MODEL), what="model", flag="--model", root=root,
                        revision=model_revision or revision, space_id=space_id)
    rankings_src = _source(rankings, bundled=Path(DEFAULT_RANKINGS), what="rankings", flag="--rankings", root=root,
                           revision=rankings_revision or revision, space_id=space_id)
    if rankings_src.bundled and not model_src.bundled:
        raise DeployError(f"the bundled rankings ({rankings_src.name}) were computed for the bundled toy VLM, not "
                          f"for {model_src.name}; rank that model and push its rankings (python -m hones_core rank "
                          f"... then push --repo-id you/hones-rankings), and pass that repo as --rankings",
                          space_id=space_id)
    if not (root / "app.py").is_file() or not (root / "hones_core").is_dir():
        raise DeployError(f"deploy uploads the app from a checkout of the repository, and {root} has no app.py / "
                          f"hones_core/: run it from the repository root", space_id=space_id)

    files: dict[str, Path | bytes] = {"app.py": root / "app.py"}
    folders = [root / "hones_core", root / DEFAULT_EXAMPLES.relative_to(REPO_ROOT)]   # the app needs its gallery
    folders += [root / s.name for s in (model_src, rankings_src) if s.bundled]
    for folder in folders:
        files.update(_tree(folder, root))
    files["requirements.txt"] = _requirements(root / "requirements.txt", zero_gpu=hardware == "zero-a10g")
    front = _front_matter(root / "README.md", model_src, rankings_src, hardware)
    files["README.md"] = _readme(front, model_src, rankings_src)

    variables = {}
    if not model_src.bundled:          # unset, the app serves the bundled toy VLM
        variables["HONES_MODEL"] = model_src.name
    if not rankings_src.bundled:
        variables["HONES_RANKINGS"] = rankings_src.name
    for key, value in (("HONES_REVISION", revision), ("HONES_MODEL_REVISION", model_revision),
                       ("HONES_RANKINGS_REVISION", rankings_revision)):
        if value is not None:
            variables[key] = value
    return DeployPlan(space_id=space_id, model=model_src, rankings=rankings_src, files=files, variables=variables,
                      front_matter=front, hardware=hardware, private=private)


def _check_space_id(space_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hint = "give it as owner/name, e.g. --space-id you/hones-demo (letters, digits, '-', '_', '.')"
    if not isinstance(space_id, str) or space_id.count("/") != 1 or not all(space_id.split("/")):
        raise DeployError(f"--space-id {space_id!r} is not a Space id: {hint}", space_id=space_id)
    try:
        validate_repo_id(space_id)
    except HFValidationError as e:
        raise DeployError(f"--space-id {space_id!r} is not a Space id ({e}): {hint}", space_id=space_id) from None


def _source(name: str, *, bundled: Path, what: str, flag: str, root: Path, revision: str | None,
            space_id: str) -> Source:
    """A --model / --rankings value: the bundled folder, or a Hub repo id; any other folder is refused."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name).expanduser()
    if path.exists():
        if path.resolve() != bundled.resolve():
            push = ("hf upload you/my-vlm " + str(path) if what == "model" else
                    f"python -m hones_core push --rankings {path} --repo-id you/hones-rankings")
            raise DeployError(f"{flag} {name} is a local folder; a Space downloads its {what} from the Hub, and "
                              f"only the repository's bundled {what} ({bundled.relative_to(REPO_ROOT)}) is uploaded "
                              f"with the app. Push it to the Hub first ({push}) and pass the repo id",
                              space_id=space_id)
        if revision is not None:
            raise DeployError(f"a revision was given for the {what}, but {flag} {name} is the bundled folder, "
                              f"which has none; use --model-revision / --rankings-revision for the Hub repo only",
                              space_id=space_id)
        return Source(str(bundled.relative_to(REPO_ROOT)), bundled=True)
    try:
        if name.startswith((".", "/", "~")):
            raise HFValidationError("a path")
        validate_repo_id(name)
    except HFValidationError:
        raise DeployError(f"{flag} {name!r} is neither a Hub repo id (owner/name) nor an existing folder; give "
                          f"the Hub id of the {what}, or the bundled {bundled.relative_to(REPO_ROOT)}",
                          space_id=space_id) from None
    return Source(name, bundled=False, revision=revision)


def _tree(folder: Path, root: Path) -> dict[str, Path]:
    """Every file under `folder` (path relative to `root` -> file), without caches and hidden files."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
            continue
        if path.suffix in (".pyc", ".pyo", ".pyi"):      # gradio may write .pyi stubs next to components
            continue
        out[rel.as_posix()] = path
    return out


def _requirements(path: Path, *, zero_gpu: bool) -> bytes:
    """The repository's requirements minus NOT_FOR_THE_SPACE, plus `spaces` on ZeroGPU."""
    lines = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name = re.match(r"[A-Za-z0-9_.\-]+", stripped)
        if name and name.group(0).lower() in NOT_FOR_THE_SPACE:
            continue
        lines.append(stripped)
    if zero_gpu:
        lines.append("spaces")      # app.py wraps its model calls in spaces.GPU when it can import it
    return ("\n".join(lines) + "\n").encode()


def _gradio_version() -> str:
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        raise DeployError("gradio is not installed here; the Space runs the gradio version you tested with "
                          "(its sdk_version), so install requirements.txt first (pip install -r requirements.txt)"
                          ) from None


def _front_matter(readme: Path, model: Source, rankings: Source, hardware: str | None) -> dict:
    """The repository README's front matter (title, colours, ...) with the Space's own keys."""
    base = {}
    if readme.is_file():
        text = readme.read_text()
        if text.startswith("---\n") and "\n---" in text[4:]:
            base = yaml.safe_load(text[4:text.index("\n---", 4)]) or {}
    front = {k: v for k, v in base.items() if k in ("title", "emoji", "colorFrom", "colorTo", "pinned",
                                                      "short_description", "license")}
    front.setdefault("title", "HONES Space")
    front.update({"sdk": "gradio", "sdk_version": _gradio_version(), "python_version": PYTHON_VERSION,
                  "app_file": "app.py"})
    if not model.bundled:
        front["models"] = [model.name]
        front["preload_from_hub"] = [model.name]     # `deploy` pins it to the commit it checks
    if not rankings.bundled:
        front["datasets"] = [rankings.name]
    if hardware is not None:
        front["suggested_hardware"] = hardware
    return front


def _readme(front: dict, model: Source, rankings: Source) -> bytes:
    def label(source: Source, prefix: str) -> str:
        if source.bundled:
            return f"the bundled `{source.name}`"
        at = f" @ `{source.revision}`" if source.revision else ""
        return f"[{source.name}](https://huggingface.co/{prefix}{source.name}){at}"

    body = (f"# {front['title']}\n\n"
            f"HONES (Head-Oriented Neuron Explanation & Steering, arXiv 2604.17941): base vs steered answers of a "
            f"vision-language model, side by side, with the heads and neurons behind them.\n\n"
            f"- model: {label(model, '')}\n- rankings: {label(rankings, 'datasets/')}\n\n"
            f"Deployed with `python -m hones_core deploy`; the variables HONES_MODEL, HONES_RANKINGS and "
            f"HONES_*_REVISION in the Space settings choose what it serves (see `python app.py --help`).\n")
    return ("---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body).encode()


# --------------------------------------------------------------------------- online: deploy


def deploy(deploy_plan: DeployPlan, *, token: str | None = None) -> DeployResult:
    """Create or update the Space of a plan.

    In order: the token is looked up (before any request); the model and rankings repos are
    looked up on the Hub (so a typo fails before the Space is touched), and their revisions
    pinned to commits for `preload_from_hub`; the Space is created (or found) with the gradio
    SDK, made private if asked; one commit adds or changes the plan's files and deletes
    files of an earlier deploy that are no longer part of the app (none when nothing
    changed); the HONES_* variables are set and stale ones deleted; hardware is requested.

    Args:
        deploy_plan: from `plan`.
        token: a write token (default: HF_TOKEN, else the saved `hf auth login`).

    Returns:
        The DeployResult. A hardware request the Hub refuses (ZeroGPU needs a PRO account or
        an organisation's plan) does not undo the deploy: `result.hardware` holds
        {"granted": False, "error": ...} and the caller decides (the CLI prints the summary,
        then exits with an error naming the fix).

    Raises:
        DeployError: no token; the model or rankings repo (or revision) not found or not
            readable with this token; the token may not write to the Space's namespace; the
            Hub cannot be reached.
    """
    from huggingface_hub import HfApi, constants, get_token

    p = deploy_plan
    token = token or get_token()
    if not token:
        raise DeployError(f"no Hugging Face token: creating {p.space_id} needs one with write access. Run "
                          f"`hf auth login`, or set HF_TOKEN (a token from https://huggingface.co/settings/tokens)",
                          space_id=p.space_id)
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    step = "looking up the model and rankings"
    try:
        front = dict(p.front_matter)
        if not p.model.bundled:
            front["preload_from_hub"] = [_preload_entry(api, p.model, p.space_id)]
        if not p.rankings.bundled:
            _check_repo(api, p.rankings, "dataset", p.space_id)
        files = dict(p.files)
        files["README.md"] = _readme(front, p.model, p.rankings)
        step = "creating the Space"
        url, private = _space(api, p)
        step = "uploading the app files"
        commit, uploaded, deleted = _commit(api, p.space_id, files)
        step = "setting the Space's variables"
        variables_set, variables_deleted = _variables(api, p.space_id, p.variables)
        step = "requesting hardware"
        hardware = _hardware(api, p.space_id, p.hardware) if p.hardware else None
    except transport_errors() as e:
        raise DeployError(f"could not reach the Hub at {constants.ENDPOINT} while {step} for {p.space_id}: {e}; "
                          f"check the connection (or HF_ENDPOINT) and rerun (a rerun picks up where this one "
                          f"stopped)", space_id=p.space_id) from e
    except HfHubHTTPError as e:
        raise DeployError(f"the Hub refused {step} for {p.space_id} ({_reason(e)}); check that the token has write "
                          f"access to {p.space_id.split('/')[0]}, then rerun (a rerun picks up where this one "
                          f"stopped)", space_id=p.space_id) from None
    return DeployResult(space_id=p.space_id, url=str(url), commit=commit, uploaded=uploaded, deleted=deleted,
                        variables_set=variables_set, variables_deleted=variables_deleted, private=private,
                        preload_from_hub=list(front.get("preload_from_hub", [])), hardware=hardware,
                        files=sorted(files))


def _check_repo(api, source: Source, repo_type: str, space_id: str):
    """The Hub's info of a model / dataset repo, or a DeployError that says what to fix."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    what = "model" if repo_type == "model" else "rankings dataset"
    flag = "--model" if repo_type == "model" else "--rankings"
    try:
        return api.repo_info(source.name, repo_type=repo_type, revision=source.revision)
    except GatedRepoError:
        raise DeployError(f"the {what} {source.name} is gated: accept its conditions on the Hub, and add an HF_TOKEN "
                          f"secret to the Space so it can download it", space_id=space_id) from None
    except RevisionNotFoundError:
        raise DeployError(f"the {what} {source.name} has no revision {source.revision!r}: give a branch, tag or "
                          f"commit it has", space_id=space_id) from None
    except RepositoryNotFoundError:
        hint = ("push it first (hf upload you/my-vlm path/to/model)" if repo_type == "model" else
                "push it first (python -m hones_core push --rankings DIR --repo-id you/hones-rankings)")
        raise DeployError(f"{flag} {source.name}: no such {what} on the Hub, or it is private and this token cannot "
                          f"read it; check the id, or {hint}", space_id=space_id) from None


def _preload_entry(api, model: Source, space_id: str) -> str:
    """`preload_from_hub` line of the model: the repo at its default branch, or its files at the pinned commit.

    The Hub's format is "repo_id", or "repo_id file1,file2 commit_sha" for one commit.
    """
    info = _check_repo(api, model, "model", space_id)
    if model.revision is None:
        return model.name
    names = sorted(s.rfilename for s in info.siblings or [] if s.rfilename != KEPT)
    return f"{model.name} {','.join(names)} {info.sha}"


def _space(api, p: DeployPlan) -> tuple[str, bool]:
    """Create the Space (or find it); make it private if asked. Returns (url, private)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = api.create_repo(p.space_id, repo_type="space", space_sdk="gradio", exist_ok=True,
                              private=True if p.private else None)
        info = api.repo_info(p.space_id, repo_type="space")
    except HfHubHTTPError as e:
        raise DeployError(f"could not create or open the Space {p.space_id}: {_reason(e)}; the token needs write "
                          f"access to {p.space_id.split('/')[0]} (a 'write' token, or a fine-grained one with write "
                          f"access to that namespace)", space_id=p.space_id) from None
    if info.sdk not in (None, "gradio"):
        raise DeployError(f"{p.space_id} is a {info.sdk} Space; this app needs a gradio one: pick another --space-id, "
                          f"or change its SDK in the Space settings", space_id=p.space_id)
    private = bool(info.private)
    if p.private and not private:      # an existing public Space: --private makes it private
        api.update_repo_settings(p.space_id, repo_type="space", private=True)
        private = True
    return str(url), private


def _commit(api, space_id: str, files: dict[str, Path | bytes]) -> tuple[str | None, list[str], list[str]]:
    """One commit adding the files that differ from the Space's and deleting what an earlier deploy left.

    Returns (the commit's sha, or None when nothing differs and no commit was made; the paths
    uploaded; the paths deleted).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub import RepoFile

    remote = {entry.path: entry for entry in api.list_repo_tree(space_id, repo_type="space", recursive=True)
              if isinstance(entry, RepoFile)}
    contents = {name: data if isinstance(data, bytes) else data.read_bytes() for name, data in files.items()}
    uploaded = sorted(name for name, data in contents.items()
                      if name not in remote or not _same_file(remote[name], data))
    deleted = sorted(set(remote) - set(files) - {KEPT})
    if not uploaded and not deleted:
        return None, [], []
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=contents[name]) for name in uploaded]
    operations += [CommitOperationDelete(path_in_repo=name) for name in deleted]
    info = api.create_commit(space_id, operations, repo_type="space",
                             commit_message="Deploy the HONES app (python -m hones_core deploy)")
    return info.oid, uploaded, deleted


def _same_file(entry, data: bytes) -> bool:
    """Whether a file of the Space's tree holds `data`: by LFS sha256, else by git blob id."""
    if entry.lfs is not None:
        return entry.lfs.sha256 == hashlib.sha256(data).hexdigest()
    return entry.blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _variables(api, space_id: str, wanted: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Set the wanted variables that differ; delete managed ones not wanted. (set, deleted)."""
    current = {k: v.value for k, v in api.get_space_variables(space_id).items()}
    changed = {k: v for k, v in wanted.items() if current.get(k) != v}
    for key, value in changed.items():
        api.add_space_variable(space_id, key, value, description="set by python -m hones_core deploy")
    stale = [k for k in MANAGED_VARIABLES if k in current and k not in wanted]
    for key in stale:
        api.delete_space_variable(space_id, key)
    return changed, stale


def _hardware(api, space_id: str, hardware: str) -> dict:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.request_space_hardware(space_id, hardware)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status not in (400, 401, 402, 403):     # anything but "not allowed": `deploy` reports the failure
            raise
        return {"requested": hardware, "granted": False, "error": _reason(e)}
    return {"requested": hardware, "granted": True}


def _reason(err) -> str:
    response = getattr(err, "response", None)
    message = response.headers.get("X-Error-Message") if response is not None else None
    return f"HTTP {response.status_code if response is not None else '?'}: {message or str(err).splitlines()[0]}"


def hardware_refused_message(result: DeployResult) -> str:
    """What a user does when the Hub refused the hardware request (the Space is deployed)."""
    hw = result.hardware or {}
    return (f"{result.space_id} is deployed ({result.url}), but the Hub refused the request for {hw.get('requested')} "
            f"({hw.get('error')}); it runs on its current hardware. ZeroGPU (zero-a10g) needs a PRO account or an "
            f"organisation plan: pick the hardware in the Space's Settings (its README suggests it), or rerun with "
            f"--hardware cpu-basic")


__all__ = ["HARDWARE", "MANAGED_VARIABLES", "Source", "DeployPlan", "DeployResult", "plan", "deploy",
           "hardware_refused_message"]
