"""`python -m hones_core <command>`: each command prints one JSON summary per result on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__, presets
from .errors import UsageError
from .presets import PRESETS
from .tasks import N_NEGATIVES, TASKS


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --revision, --device, --dtype, --trust-remote-code (also used by `benchmarks.rank`)."""
    p.add_argument("--model", required=True, help="Hub model id or local directory")
    p.add_argument("--revision", default=None, help="branch, tag or commit of the model repo")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--trust-remote-code", action="store_true", help="run code from the model repo (off by default)")
    p.add_argument("--compat", default="ours", choices=["ours", "official"],
                   help="official: the official release's input choices (LLaVA's hand-written prompt, DVP targets "
                        "encoded bare), to reproduce its numbers; ours (default) uses the chat template and the "
                        "tokens the model emits (README, 'Compatibility with the official release')")


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="merged-COCO JSON or JSONL file")
    p.add_argument("--images", default=None, help="image folder (default: images/ next to the data file)")
    p.add_argument("--limit", type=int, default=None, help="use the first N items of each task")
    p.add_argument("--seed", type=int, default=0, help="seed for retrieval negatives")
    p.add_argument("--n-negatives", type=int, default=N_NEGATIVES,
                   help=f"hard negatives per retrieval item (default {N_NEGATIVES}, the paper's; each costs one "
                        f"forward row per item)")
    p.add_argument("--batch-size", type=int, default=16)


def _add_preset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="the paper's protocol: every value the official config sets (K_h, ratio, limits, seed "
                        "3407, 49 retrieval negatives, ...); flags given here override it (hones_core/presets.py)")


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-map", default=None, choices=["auto"],
                   help="split a model too big for one device over this process's GPUs (transformers/accelerate)")
    p.add_argument("--gpus-per-process", type=int, default=None,
                   help="with --device-map auto under accelerate launch: GPUs each process takes (consecutive)")


def _shard(args: argparse.Namespace):
    """This process's shard (several when started by `accelerate launch`) and the model loaded for it."""
    from . import distributed
    from .models import load_vlm

    shard = distributed.current(cpu=True if args.device == "cpu" else None)
    placement = distributed.device_placement(shard, device=args.device, device_map=args.device_map,
                                             gpus_per_process=args.gpus_per_process)
    vlm = load_vlm(args.model, revision=args.revision, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                   compat=args.compat, **placement)
    return shard, vlm


def _tasks(arg: str) -> list[str]:
    return list(TASKS) if arg == "all" else [arg]


def cmd_evaluate(args: argparse.Namespace) -> list[dict]:
    from .evaluation import evaluate

    vlm = _load(args)
    results = []
    for task, items in _task_items(args).items():
        result = evaluate(vlm, items, batch_size=args.batch_size, progress=True)
        print(json.dumps(result.summary()), flush=True)
        results.append(result.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def _load(args: argparse.Namespace):
    from .models import load_vlm

    return load_vlm(args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                    trust_remote_code=args.trust_remote_code, compat=args.compat)


def _task_items(args: argparse.Namespace, data_file: str | None = None, limit: int | None = None) -> dict:
    from .data import read_records
    from .tasks import items_for_task

    records = read_records(data_file or args.data, args.images)
    limit = args.limit if limit is None else limit
    return {task: items_for_task(task, records, n_negatives=args.n_negatives, seed=args.seed, limit=limit)
            for task in _tasks(args.task)}


def cmd_rank(args: argparse.Namespace) -> dict:
    from .pipeline import RankParams, rank

    shard, vlm = _shard(args)
    params = RankParams(utility=args.utility, top_heads=args.top_heads, top_ratio=args.top_ratio, limit=args.limit,
                        seed=args.seed, n_negatives=args.n_negatives, batch_size=args.batch_size,
                        compat=args.compat, preset=args.preset)
    artifact = rank(vlm, _task_items(args), args.out, data_file=args.data, params=params, shard=shard)
    summary = {"out": args.out, "model": vlm.name, "processes": shard.count, "preset": args.preset_info, "tasks": {
        task: {"top_heads": [list(h) for h in r.top_heads], "fallback": r.fallback,
               "neurons": sum(len(v) for v in r.select("hones", args.top_ratio).values()),
               "positive_importance": r.positive("hones"), "budget_shortfall": r.shortfall("hones", args.top_ratio),
               "methods": r.methods(), "notes": r.notes}
        for task, r in artifact.tasks.items()}}
    if shard.is_main:
        print(json.dumps(summary), flush=True)
    return summary


def cmd_stats(args: argparse.Namespace) -> dict:
    """Add per-neuron discovery statistics to an existing artifact (`pipeline.add_stats`), without re-ranking."""
    from . import rankings
    from .pipeline import add_stats

    params = rankings.load(args.rankings).params     # the rank run's item selection, unless given
    for name in ("limit", "seed", "n_negatives"):
        if getattr(args, name) is None:
            setattr(args, name, params.get(name, {"limit": None, "seed": 0, "n_negatives": N_NEGATIVES}[name]))
    shard, vlm = _shard(args)
    stats = add_stats(vlm, _task_items(args), args.rankings, data_file=args.data, batch_size=args.batch_size,
                      shard=shard)
    summary = {"rankings": args.rankings, "model": vlm.name, "data": args.data,
               "tasks": {task: {"items": s.items, "position": s.position} for task, s in stats.items()}}
    if shard.is_main:
        print(json.dumps(summary), flush=True)
    return summary


def cmd_mask_eval(args: argparse.Namespace) -> dict:
    from . import __version__, rankings
    from .masking import report

    shard, vlm = _shard(args)
    artifact = rankings.load(args.rankings, revision=args.rankings_revision)
    other_model = rankings.check_against(artifact, vlm.arch, model_id=vlm.name, revision=vlm.revision,
                                         allow_other_model=args.allow_other_model)
    from .pipeline import image_digests

    task_items = _task_items(args)
    digests = image_digests(task_items)
    task_items, dropped = _held_out(artifact, task_items, digests, args.data, drop=args.drop_overlapping)
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else
               [m for m in artifact.task(next(iter(task_items))).methods()
                if all(artifact.task(t).has(m) for t in task_items)])
    _check_methods(artifact, list(task_items), methods)
    budgets = _budgets(args.budgets)
    results = report(vlm, task_items, artifact, methods=methods, ratio=args.top_ratio, budgets_pct=budgets,
                     cross=args.cross, seed=args.seed, batch_size=args.batch_size, shard=shard)
    results["processes"] = shard.count
    results["preset"] = args.preset_info
    if dropped:
        results["dropped_overlapping"] = dropped
    if other_model:
        results["other_model"] = other_model
    if shard.is_main:
        print(json.dumps(results), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        if args.into_rankings:
            _store_evaluation(args, artifact, task_items, digests, results, __version__)
    return results


def _held_out(artifact, task_items: dict, digests: dict[str, str], data_file: str, *, drop: bool
              ) -> tuple[dict, dict[str, int]]:
    """The items, checked against the artifact's discovery images (the manifest's content digests).

    A split sharing images with the discovery split is refused; with `drop`, its items on
    those images are left out instead, and the counts returned (recorded in the results).
    """
    discovery = set(artifact.data.get("image_digests") or [])
    if not discovery:
        return task_items, {}    # artifacts from before the digests were recorded: nothing to compare with
    shared = discovery & set(digests.values())
    if not shared:
        return task_items, {}
    if not drop:
        raise UsageError(f"{data_file} shares {len(shared)} image(s) with the discovery split these rankings were "
                         f"computed on ({artifact.data.get('file')}; same pixels, compared by content digest); "
                         f"masking is measured on held-out data — use a split of other images, or pass "
                         f"--drop-overlapping to leave those items out")
    kept, dropped = {}, {}
    for task, items in task_items.items():
        kept[task] = [i for i in items if digests[str(i.image_path)] not in shared]
        dropped[task] = len(items) - len(kept[task])
        if not kept[task]:
            raise UsageError(f"--drop-overlapping: every {task} item of {data_file} shows a discovery image; no "
                             f"held-out {task} item is left — use a split of other images")
    return kept, {t: n for t, n in dropped.items() if n}


def _budgets(text: str | None) -> list[float]:
    """--budgets "0.5,1,2" -> [0.5, 1.0, 2.0] (percent), each in (0, 100]."""
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--budgets takes percentages separated by commas, e.g. 0.5,1,2,5; got {text!r}") from None
    bad = [v for v in values if not 0 < v <= 100]
    if bad or not values:
        raise UsageError(f"--budgets: every budget is a percentage above 0 and at most 100; got {text!r}")
    return sorted(set(values))


def _store_evaluation(args: argparse.Namespace, artifact, task_items: dict, digests: dict[str, str], results: dict,
                      version: str) -> None:
    """`--into-rankings`: the results as the artifact's evaluation.json, with the split they came from."""
    from . import rankings
    from .files import digest

    if artifact.source and artifact.source.get("commit"):
        raise UsageError("--into-rankings writes into a local artifact folder; this one came from the Hub. "
                         "Download it (or use the folder you pushed) and rerun, then `push` it again")
    used = {str(item.image_path) for items in task_items.values() for item in items}
    doc = {"split": {"file": str(Path(args.data)), "digest": digest(sorted(digests[p] for p in used)),
                     "items": {task: len(items) for task, items in task_items.items()}},
           "seed": args.seed, "n_negatives": args.n_negatives, "created_with": f"hones_core {version}", **results}
    doc["budgets_pct"] = results.get("budgets_pct", [args.top_ratio * 100])
    if "drops" not in results:      # the one budget that was run
        key = f"{args.top_ratio * 100:g}"
        doc["drops"] = {task: {m: {key: drop} for m, drop in by_method.items()}
                        for task, by_method in results["tasks"].items()}
    doc["cross"] = results.get("cross_ablation", {})
    doc["groups"] = results.get("cross")
    rankings.save_evaluation(args.rankings, doc)


def _check_methods(artifact, tasks: list[str], methods: list[str]) -> None:
    """Refuse, before any evaluation, a method that some task's rankings do not carry (naming those they do)."""
    from .errors import RankingsError

    if not methods:
        raise RankingsError("--methods is empty; give a comma-separated list such as hones,ap,ma,ape,random")
    for task in tasks:
        ranking = artifact.task(task)
        unknown = [m for m in methods if not ranking.has(m)]
        if unknown:
            hint = (" (ape is stored only by a rank run over all four tasks: --task all)" if "ape" in unknown
                    else "")
            raise RankingsError(f"--methods {','.join(unknown)}: not in the {task!r} rankings; available: "
                                f"{', '.join(ranking.methods())}{hint}")


def cmd_steer(args: argparse.Namespace) -> dict:
    from . import rankings
    from .steering import METHODS, SteerConfig, results_table, run_task

    if Path(args.dev).resolve() == Path(args.test).resolve():
        raise ValueError(f"--dev and --test are the same file ({args.dev}); steering is chosen on dev and "
                         "reported on test, so give two disjoint splits")
    if args.into_rankings and not Path(args.rankings).is_dir():
        raise ValueError(f"--into-rankings writes into a local artifact folder; {args.rankings} is not one "
                         "(pull the Hub repo to a folder first, or copy <out>/<task>/scales.safetensors yourself)")
    vlm = _load(args)
    artifact = rankings.load(args.rankings, revision=args.rankings_revision)
    other_model = rankings.check_against(artifact, vlm.arch, model_id=vlm.name, revision=vlm.revision,
                                         allow_other_model=args.allow_other_model)
    methods = list(METHODS) if args.method == "all" else [args.method]
    cfg = SteerConfig(epochs=args.epochs, seed=args.seed, lr=args.lr, train_negatives=args.train_negatives)
    dev, test = _task_items(args, args.dev, args.dev_limit), _task_items(args, args.test, args.test_limit)
    info = {"dev_file": str(Path(args.dev).resolve()), "test_file": str(Path(args.test).resolve()),
            "limit": args.limit, "n_negatives": args.n_negatives}
    # recorded only where used, so the results of runs without them keep resuming
    info.update({k: v for k, v in (("dev_limit", args.dev_limit), ("test_limit", args.test_limit),
                                   ("preset", args.preset_info), ("other_model", other_model)) if v is not None})
    docs = []
    for task in dev:
        ranking = artifact.task(task)
        run = run_task(vlm, ranking, dev[task], test[task], methods, args.out, ratio=args.ratio, cfg=cfg,
                       batch_size=args.batch_size, run_info=info)
        if args.into_rankings and "learned" in run.doc["results"]:
            rankings.save_scales(args.rankings, task, run.scales("learned"))
        docs.append(run.doc)
    Path(args.out, "table.md").write_text(results_table(docs))
    summary = {"out": args.out, "model": vlm.name, "tasks": {
        d["task"]: {"metric_name": d["metric_name"], "n_test": d["n_test"], "neurons": d["neurons"],
                    **{m: r["metric"] for m, r in d["results"].items()}} for d in docs}}
    print(json.dumps(summary), flush=True)
    return summary


def cmd_push(args: argparse.Namespace) -> None:
    from . import plots, rankings

    if not args.no_figures:
        plots.write_card_figures(args.rankings)
    url = rankings.push(args.rankings, args.repo_id, private=args.private, revision=args.revision)
    print(json.dumps({"repo_id": args.repo_id, "commit": url}), flush=True)


def cmd_deploy(args: argparse.Namespace) -> dict:
    """Create or update a Space serving the app; every input is checked before the first request."""
    from . import deploy
    from .errors import DeployError

    deploy_plan = deploy.plan(space_id=args.space_id, model=args.model, rankings=args.rankings,
                              revision=args.revision, model_revision=args.model_revision,
                              rankings_revision=args.rankings_revision, hardware=args.hardware, private=args.private)
    result = deploy.deploy(deploy_plan)
    summary = result.summary()
    print(json.dumps(summary), flush=True)
    if result.hardware and not result.hardware["granted"]:
        raise DeployError(deploy.hardware_refused_message(result), space_id=result.space_id)
    return summary


def cmd_toy_data(args: argparse.Namespace) -> None:
    from .toy import world

    argv = ["--out", args.out, "--seed", str(args.seed), "--n-discovery", str(args.n_discovery),
            "--n-dev", str(args.n_dev), "--n-test", str(args.n_test), "--n-train", str(args.n_train),
            "--image-size", str(args.image_size), "--shift", args.shift]
    world.main(argv)


def cmd_toy_train(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .toy.train import RECIPES, train

    recipe = replace(RECIPES[args.recipe], seed=args.seed).only(args.stage)
    if args.steps_scale != 1.0:
        recipe = recipe.scaled(args.steps_scale)
    on_evaluate = None
    if args.eval_every:
        from .toy.evaluate import report

        def on_evaluate(vlm, stage, step):
            result = report(vlm, seed=args.eval_seed, n=args.eval_n, tasks=("vqa",))
            print(json.dumps({"stage": stage, "step": step, "vqa": {k: v["accuracy"] for k, v in result["vqa"].items()}}),
                  flush=True)

    summary = train(args.out, recipe, init=args.init, threads=args.threads,
                    checkpoint_minutes=args.checkpoint_minutes, evaluate_every=args.eval_every,
                    on_evaluate=on_evaluate)
    print(json.dumps({k: v for k, v in summary.items() if k != "stages"}
                     | {"stages": [{k: st[k] for k in ("name", "steps", "seconds", "last_loss")} for st in summary["stages"]]}),
          flush=True)


def cmd_toy_eval(args: argparse.Namespace) -> dict:
    from .toy.evaluate import report

    vlm = _load(args)
    result = report(vlm, seed=args.seed, n=args.n, shift=args.shift,
                    negatives=tuple(int(k) for k in args.negatives.split(",")), batch_size=args.batch_size)
    print(json.dumps(result), flush=True)
    return result


def cmd_toy_examples(args: argparse.Namespace) -> dict:
    """The app's gallery: chosen by running the app on a fresh split (default), or `--plain` first scenes."""
    from .toy.examples import GALLERY_N, GALLERY_SEED, choose_gallery, write_examples

    seed = GALLERY_SEED if args.seed is None else args.seed
    n = GALLERY_N if args.n is None else args.n
    if args.plain:
        entries = write_examples(args.out, seed=seed, per_task=args.per_task)
        result = {"out": args.out, "examples": len(entries)}
        print(json.dumps(result), flush=True)
        return result
    from .demo import DemoService

    service = DemoService.load(args.model, args.rankings, device=args.device)
    command = (f"python -m hones_core toy-examples --out {args.out} --seed {seed} --n {n} "
               f"--per-task {args.per_task} --budget {args.budget:g} --factor {args.factor:g}")
    document = choose_gallery(args.out, service=service, seed=seed, n=n, per_task=args.per_task,
                              budget_pct=args.budget, factor=args.factor, command=command)
    result = {"out": args.out, "examples": len(document["examples"]), "default_task": document["default_task"],
              "summary": {t: {k: s[k] for k in ("n", "base_right", "changed_hones", "changed_random",
                                                "right_changed_hones")} for t, s in document["summary"].items()}}
    print(json.dumps(result), flush=True)
    return result


BENCHMARKS = {"bench-rank": "benchmarks.rank", "bench-app": "benchmarks.app"}


def cmd_benchmark(args: argparse.Namespace) -> int:
    """`bench-rank` / `bench-app`: `python -m benchmarks.rank` / `benchmarks.app` with the same arguments.

    The benchmarks live in the repository's top-level `benchmarks/` folder, not in the library,
    so they are imported only here (and are missing from an installed library).
    """
    import importlib

    name = BENCHMARKS[args.command]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name not in ("benchmarks", name):
            raise          # something the benchmark itself needs is missing: show that
        raise SystemExit(
            f"python -m hones_core {args.command}: the benchmark is {name}, in the benchmarks/ folder of the "
            f"repository, and it cannot be imported here ({err}). Run it from the root of a checkout of the "
            f"repository: python -m {name} [options]") from None
    return module.main(args.benchmark_args, prog=f"python -m hones_core {args.command}")


def build_parser() -> argparse.ArgumentParser:
    """The `python -m hones_core` parser, one subcommand per `cmd_*` function."""
    parser = argparse.ArgumentParser(prog="python -m hones_core", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hones_core {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(sub)    # in this order in --help
    _add_tool_commands(sub)
    return parser


def _add_model_commands(sub) -> None:
    """evaluate, rank, mask-eval, steer: the commands that run a model on data."""
    p = sub.add_parser("evaluate", help="task metric of a model on a data file")
    add_model_arguments(p)
    _add_data(p)
    p.add_argument("--task", required=True, choices=[*TASKS, "all"])
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("rank", help="score heads and rank neurons (HONES); writes a rankings artifact",
                       allow_abbrev=False)
    add_model_arguments(p)
    _add_data(p)
    p.add_argument("--task", required=True, choices=[*TASKS, "all"])
    p.add_argument("--out", required=True, help="artifact folder (also holds progress; rerun to resume)")
    p.add_argument("--utility", default="metric", choices=["metric", "logprob"])
    p.add_argument("--top-heads", type=int, default=None, help="K_h (default: 3%% of all heads, at least 4)")
    p.add_argument("--top-ratio", type=float, default=0.01, help="neuron budget as a fraction (default 0.01)")
    _add_placement(p)
    _add_preset(p)
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("stats", allow_abbrev=False,
                       help="add per-neuron discovery statistics (the app's neuron card) to an artifact ranked "
                            "without them, from the discovery split it was ranked on")
    add_model_arguments(p)
    _add_data(p)
    p.add_argument("--rankings", required=True, help="local artifact folder")
    p.add_argument("--task", default="all", choices=[*TASKS, "all"])
    p.set_defaults(func=cmd_stats, limit=None, seed=None, n_negatives=None)
    _add_placement(p)

    p = sub.add_parser("mask-eval", help="metric drop when each method's neurons are masked", allow_abbrev=False)
    add_model_arguments(p)
    _add_data(p)
    p.add_argument("--rankings", required=True, help="artifact folder or Hub dataset repo id")
    p.add_argument("--rankings-revision", default=None)
    p.add_argument("--task", required=True, choices=[*TASKS, "all"])
    p.add_argument("--methods", default=None,
                   help="comma-separated neuron sets to mask (default: every one all the tasks' rankings carry: "
                        "hones, the paper's ap, ma, ape, our activation (alias magnitude) and dvp, and random)")
    p.add_argument("--top-ratio", type=float, default=0.01)
    p.add_argument("--budgets", default=None,
                   help="also every method at each of these budgets, in %% (e.g. 0.5,1,2,5,10): budget curves")
    p.add_argument("--cross", action="store_true",
                   help="also the 4 x 4 cross-ablation matrix per method (task A's set masked, drop on task B), "
                        "with its specificity, the Jaccard overlaps and cross-task group masking")
    p.add_argument("--into-rankings", action="store_true",
                   help="store the results in the (local) artifact as evaluation.json, shown by its card and the app")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use rankings computed for another Hub model of the same shapes (recorded in the results)")
    p.add_argument("--drop-overlapping", action="store_true",
                   help="leave out items whose image is pixel-identical to a discovery image (else refused; the "
                        "counts are recorded)")
    p.add_argument("--json", default=None)
    _add_placement(p)
    _add_preset(p)
    p.set_defaults(func=cmd_mask_eval)

    p = sub.add_parser("steer", help="fixed, grid-searched and learned neuron scaling; chosen on dev, "
                                     "reported on test", allow_abbrev=False)
    add_model_arguments(p)
    p.add_argument("--rankings", required=True, help="artifact folder or Hub dataset repo id")
    p.add_argument("--rankings-revision", default=None)
    p.add_argument("--task", required=True, choices=[*TASKS, "all"])
    p.add_argument("--dev", required=True, help="dev split (factors chosen and scales learned here)")
    p.add_argument("--test", required=True, help="test split (every method reported here)")
    p.add_argument("--images", default=None, help="image folder (default: images/ next to each data file)")
    p.add_argument("--method", default="all", choices=["fixed", "grid", "learned", "learned-nokl", "random", "all"])
    p.add_argument("--out", required=True, help="results folder (also holds progress; rerun to resume)")
    p.add_argument("--limit", type=int, default=None, help="use the first N items of each split and task")
    p.add_argument("--dev-limit", type=int, default=None, help="the first N dev items of each task (overrides --limit)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="the first N test items of each task (overrides --limit)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of learned scaling (default 2)")
    p.add_argument("--lr", type=float, default=5e-4,
                   help="learning rate of learned scaling (default 5e-4, the paper's; a small model may need more, "
                        "e.g. 2e-2: README, 'Steering')")
    p.add_argument("--train-negatives", type=int, default=4,
                   help="retrieval negatives answered No per dev item and epoch in learned scaling (default 4, the "
                        "paper's)")
    p.add_argument("--ratio", type=float, default=0.01, help="neuron budget as a fraction (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed for retrieval negatives, example order, RandNeuron")
    p.add_argument("--n-negatives", type=int, default=N_NEGATIVES,
                   help=f"hard negatives per retrieval item of the test split (default {N_NEGATIVES})")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size (training uses batch 1)")
    p.add_argument("--into-rankings", action="store_true",
                   help="also store the learned scales in the (local) rankings artifact as <task>/scales.safetensors")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use rankings computed for another Hub model of the same shapes (recorded in the results)")
    _add_preset(p)
    p.set_defaults(func=cmd_steer)


def _add_tool_commands(sub) -> None:
    """push, the benchmark aliases and the toy world's commands."""
    p = sub.add_parser("push", help="upload a rankings artifact to a Hub dataset repo")
    p.add_argument("--rankings", required=True)
    p.add_argument("--repo-id", required=True)
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--private", action="store_true")
    p.add_argument("--no-figures", action="store_true",
                   help="upload as is (default: redraw the card's head-heatmap and layer-distribution figures)")
    p.set_defaults(func=cmd_push)

    _add_deploy_command(sub)

    # the benchmarks parse their own options (benchmarks/rank.py, benchmarks/app.py); main() forwards them
    p = sub.add_parser("bench-rank", add_help=False,
                       help="batched head localization vs the one-head-one-item loop (= python -m benchmarks.rank)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("toy-data", help="generate the synthetic world (images + merged-COCO JSON splits)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--n-discovery", type=int, default=200)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--n-train", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--shift", default="none", help="none, combos, small-text or clutter")
    p.set_defaults(func=cmd_toy_data)

    p = sub.add_parser("toy-train", help="train the toy VLM on the synthetic world (the staged recipe of toy/train.py)")
    p.add_argument("--out", required=True, help="where the model goes; a killed run resumes from its checkpoint there")
    p.add_argument("--stage", action="append", default=None,
                   help="run only this stage of the recipe (vision, lookup1, lookup2, lookup3, instruct); repeat for several; "
                        "default: all, in order")
    p.add_argument("--init", default=None, help="start from this saved toy VLM instead of a fresh model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every stage's steps (e.g. 0.1 for a quick probe)")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--recipe", default="shipped", choices=["shipped", "no-pointer", "no-curriculum", "image-first",
                                                          "no-vision"],
                   help="the shipped recipe or one of the ablations README measures")
    p.add_argument("--eval-every", type=int, default=0,
                   help="print VQA accuracy (every well-defined question, per type and size) on a fresh split "
                        "every N steps of a stage and at its end; 0: off")
    p.add_argument("--eval-seed", type=int, default=4242)
    p.add_argument("--eval-n", type=int, default=300)
    p.set_defaults(func=cmd_toy_train)

    p = sub.add_parser("toy-eval", help="the toy VLM's report card on a fresh world split: every well-defined "
                                        "VQA question per type and number of shapes, OCR, captions, retrieval")
    add_model_arguments(p)
    p.add_argument("--seed", type=int, default=777, help="the world seed (never one used in training)")
    p.add_argument("--n", type=int, default=300, help="images (the test split of toy-data --seed S --n-test N)")
    p.add_argument("--shift", default="none", help="none, combos, small-text or clutter")
    p.add_argument("--negatives", default="9,49", help="retrieval negatives per image, comma-separated")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_toy_eval)

    from .assets import DEFAULT_MODEL, DEFAULT_RANKINGS

    p = sub.add_parser("toy-examples", help="write the app's examples gallery (examples.json + PNGs), chosen by "
                                            "running the app on every item of a fresh split "
                                            "(hones_core/toy/examples.py)")
    p.add_argument("--out", required=True, help="folder, e.g. assets/examples")
    p.add_argument("--seed", type=int, default=None,
                   help="world seed of the split (default: toy.examples.GALLERY_SEED = 2027, used for nothing else)")
    p.add_argument("--n", type=int, default=None,
                   help="scenes in the split (default: toy.examples.GALLERY_N = 200); every task item on them "
                        "is counted")
    p.add_argument("--per-task", type=int, default=3)
    p.add_argument("--budget", type=float, default=1.0, help="%% of all FFN neurons (the app's default 1)")
    p.add_argument("--factor", type=float, default=0.0, help="scaling factor (the app's default 0 = masked)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the app's model (default: the bundled toy VLM)")
    p.add_argument("--rankings", default=DEFAULT_RANKINGS, help="its rankings (default: the bundled ones)")
    p.add_argument("--device", default="cpu", help="cpu (default, as the bundled file was made), cuda, ...")
    p.add_argument("--plain", action="store_true",
                   help="no model: the first scenes of the split, as a plain list without counts")
    p.set_defaults(func=cmd_toy_examples)

    p = sub.add_parser("bench-app", add_help=False,
                       help="cost of a side-by-side request and of a slider-only change vs one generate "
                            "(= python -m benchmarks.app)")
    p.set_defaults(func=cmd_benchmark)


def _add_deploy_command(sub) -> None:
    from .deploy import HARDWARE

    p = sub.add_parser("deploy", help="create or update a Hugging Face Space serving the app with a model and its "
                                      "rankings (needs a write token: HF_TOKEN or hf auth login)", allow_abbrev=False)
    p.add_argument("--space-id", required=True, help="the Space, owner/name (created if missing, else updated)")
    p.add_argument("--model", required=True,
                   help="Hub model id (push a local model first), or the bundled assets/toy-vlm (uploaded with the app)")
    p.add_argument("--rankings", required=True,
                   help="Hub dataset repo with the rankings (python -m hones_core push), or the bundled "
                        "assets/rankings/toy-vlm")
    p.add_argument("--revision", default=None, help="revision of both Hub repos (HONES_REVISION)")
    p.add_argument("--model-revision", default=None, help="revision of the model repo (HONES_MODEL_REVISION)")
    p.add_argument("--rankings-revision", default=None,
                   help="revision of the rankings repo (HONES_RANKINGS_REVISION)")
    p.add_argument("--hardware", default=None, metavar="|".join(HARDWARE),
                   help="request this hardware and suggest it in the Space's README (zero-a10g: ZeroGPU, needs a PRO "
                        "account or an organisation plan); default: leave the Space's hardware as it is")
    p.add_argument("--private", action="store_true", help="create the Space private (or make an existing one private)")
    p.set_defaults(func=cmd_deploy)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in BENCHMARKS:
        args.benchmark_args = rest      # the benchmark's own parser reads and checks them
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")   # what parse_args says
    args.preset_info = presets.apply(args, sys.argv[1:] if argv is None else argv)
    ok = False
    try:
        args.func(args)
        ok = True
    finally:
        _end_distributed(wait=ok)
    return 0


def _end_distributed(*, wait: bool) -> None:
    """Destroy the torch.distributed group a command set up (`distributed.current()`), if any.

    Waits for every process first after a success; after an error it only destroys the group.
    """
    if "hones_core.distributed" not in sys.modules:      # never imported: nothing was set up
        return
    from . import distributed

    distributed.shutdown(wait=wait)


if __name__ == "__main__":
    sys.exit(main())
