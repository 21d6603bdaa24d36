"""What a side-by-side request of the app costs, relative to one plain generate.

    python -m benchmarks.app                      # or: python -m hones_core bench-app
    python -m benchmarks.app --repeats 3 --no-big

For each model (the toy VLM, and a random ~200M-parameter LLaVA built from a config) the
same input is timed three ways, each the median of `repeats` round-robin runs after a warm-up:

- plain: `VLM.generate` of the one input (batch 1, no intervention);
- first: `DemoService.compute` with nothing cached: base and steered rows in one batched
  generate, FFN activations captured for the contribution plots;
- slider: `DemoService.compute` with the base result cached and another factor: only the
  steered row runs.

Ratios first/plain and slider/plain are printed as one JSON line. Running the two rows one
after the other would cost about 2.0; targets are first <= 1.5 and slider <= 1.05. Drawing the
plots is not part of these numbers (it does not touch the model); the whole request, plots
included, is timed separately for the toy VLM (`bench_request`): `request_with_plots_s`, the
process's first `DemoService.run` (it also draws the figures that depend only on task, neuron set
and budget, once); `request_s`, the median run of a new input once those are drawn; `sweep_s`,
the strength sweep the app runs right after (its own event); `request_and_sweep_s`, both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from hones_core import rankings as rankings_lib
from hones_core.assets import DEFAULT_EXAMPLES, DEFAULT_MODEL, DEFAULT_RANKINGS
from hones_core.demo import DemoService, read_examples
from hones_core.models import VLM, load_vlm
from hones_core.rankings import ModelInfo, Rankings, TaskRanking
from hones_core.testing import make_chat_template, text_kwargs, train_tokenizer


def _interleaved(fns: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds of each function, run round-robin (so a change in machine load hits all alike)."""
    values = {name: fn() for name, fn in fns.items()}   # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            values[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, values


def random_rankings(vlm: VLM, *, seed: int = 0, tasks: tuple[str, ...] = ("vqa",)) -> Rankings:
    """An artifact with seeded random scores for `vlm` (for timing only: the selection spreads over all layers)."""
    arch = vlm.arch
    generator = torch.Generator().manual_seed(seed)
    info = ModelInfo.from_arch(arch, id=vlm.name, revision=None)
    task_rankings = {}
    for task in tasks:
        heads = torch.rand(arch.num_layers, arch.num_heads, generator=generator)
        importance = torch.rand(arch.num_layers, arch.intermediate_size, generator=generator)
        top = [divmod(int(i), arch.num_heads) for i in heads.flatten().argsort(descending=True)[:4]]
        task_rankings[task] = TaskRanking(task, heads, importance, top, notes="random scores for benchmarking")
    return Rankings(model=info, tasks=task_rankings, params={"random": True})


def build_llava_200m(seed: int = 0) -> VLM:
    """A random LLaVA-1.5-style model of about 200M parameters (CLIP 224/16 tower, 12-layer Llama), in memory."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], {"image_token": "<image>"},
                                bos="<s>", eos="</s>", pad="<pad>")
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12,
                              image_size=224, patch_size=16, projection_dim=768)
    text = LlamaConfig(**text_kwargs(len(tokenizer), hidden=1024, layers=12, heads=16, kv_heads=16, intermediate=2816),
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=196,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224},
                                                                  crop_size={"height": 224, "width": 224}),
                               tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1,
                               chat_template=make_chat_template("USER: ", "ASSISTANT: ", " ", "ASSISTANT:",
                                                                "<image>\n"))
    model = LlavaForConditionalGeneration(config).eval()
    return VLM(model, processor, name="random-llava-200m")


def bench_service(service: DemoService, image, question: str, *, repeats: int, factors=(0.0, 2.0)) -> dict:
    """Timings and ratios of one model (see the module docstring)."""
    vlm = service.vlm
    first_request = service.request(task="vqa", image=image, question=question, factor=factors[0], budget_pct=1.0)
    slider_request = service.request(task="vqa", image=image, question=question, factor=factors[1], budget_pct=1.0)
    prompt = first_request.prompts[0]
    base = service.compute(first_request).base
    seconds, values = _interleaved({
        "plain": lambda: vlm.generate([first_request.image], [prompt], max_new_tokens=service.max_new_tokens),
        "first": lambda: service.compute(first_request),
        "slider": lambda: service.compute(slider_request, base),
    }, repeats)
    plain_s, first_s, slider_s = seconds["plain"], seconds["first"], seconds["slider"]
    plain, first, slider = values["plain"], values["first"], values["slider"]
    count = lambda text: len(vlm.tokenizer(text, add_special_tokens=False)["input_ids"])   # noqa: E731
    return {
        "params_M": round(sum(p.numel() for p in vlm.model.parameters()) / 1e6, 1),
        "plain_s": round(plain_s, 4), "first_s": round(first_s, 4), "slider_s": round(slider_s, 4),
        "first_ratio": round(first_s / plain_s, 3), "slider_ratio": round(slider_s / plain_s, 3),
        "new_tokens": {"plain": count(plain[0]), "base": count(first.base.answers[0]),
                       "steered": count(first.steered.answers[0]), "slider_steered": count(slider.steered.answers[0])},
        "steered_layers": sorted(service.selection("vqa", "hones", 1.0)),
    }


def bench_request(service: DemoService, image, question: str, *, repeats: int) -> dict:
    """Seconds of whole app requests (model, figures, summary, results JSON) on a fresh service state.

    The first `run` also draws the input-independent figures (they are cached from then on);
    each later repeat is a new input as far as the caches know (base, output and sweep caches
    emptied, figure cache kept), so it runs both rows and draws this input's figures.
    """
    request = service.request(task="vqa", image=image, question=question, factor=0.0, budget_pct=1.0)
    for cache in (service.figure_cache, service.base_cache, service.output_cache, service.sweep_cache):
        cache.clear()
    start = time.perf_counter()
    service.run(request)
    first = time.perf_counter() - start
    runs, sweeps = [], []
    for _ in range(repeats):
        for cache in (service.base_cache, service.output_cache, service.sweep_cache):
            cache.clear()
        start = time.perf_counter()
        service.run(request)
        middle = time.perf_counter()
        service.sweep(request)
        runs.append(middle - start)
        sweeps.append(time.perf_counter() - middle)
    return {"request_with_plots_s": round(first, 4), "request_s": round(statistics.median(runs), 4),
            "sweep_s": round(statistics.median(sweeps), 4),
            "request_and_sweep_s": round(statistics.median([r + w for r, w in zip(runs, sweeps)]), 4)}


def bench_app(*, toy_model: str | None = None, toy_rankings: str | None = None, repeats: int = 5,
              big_repeats: int = 3, big: bool = True, threads: int | None = None) -> dict:
    """Run the benchmark; returns the dict printed by the CLI (`threads`: torch's thread count, default its own)."""
    torch.set_grad_enabled(False)
    if threads is not None:
        torch.set_num_threads(threads)
    out: dict = {"threads": torch.get_num_threads()}
    vlm = load_vlm(toy_model or DEFAULT_MODEL, device="cpu")
    if toy_rankings is None and Path(DEFAULT_RANKINGS).is_dir():
        toy_rankings = DEFAULT_RANKINGS
    if toy_rankings is not None:
        artifact = rankings_lib.load(toy_rankings)
        source = toy_rankings
    else:
        artifact, source = random_rankings(vlm), "random scores"
    service = DemoService(vlm, artifact)
    examples = read_examples(DEFAULT_EXAMPLES).get("vqa") or []
    if examples:
        image, question = examples[0]["image"], examples[0]["question"]
    else:
        image, question = Image.new("RGB", (96, 96), (64, 64, 64)), "How many shapes are there?"
    out["toy"] = {"rankings": source, **bench_service(service, image, question, repeats=repeats)}
    out["toy"].update(bench_request(service, image, question, repeats=repeats))
    if big:
        big_vlm = build_llava_200m()
        big_service = DemoService(big_vlm, random_rankings(big_vlm))
        picture = Image.effect_mandelbrot((224, 224), (-2, -1.5, 1, 1.5), 64).convert("RGB")
        out["llava_200m"] = {"rankings": "random scores",
                             **bench_service(big_service, picture, "What color is the circle?", repeats=big_repeats)}
    return out


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m benchmarks.app",
        description="cost of a side-by-side request and of a slider-only change vs one generate")
    p.add_argument("--model", default=None, help="toy model directory (default: assets/toy-vlm)")
    p.add_argument("--rankings", default=None,
                   help="rankings for it (default: assets/rankings/toy-vlm when present, else random scores)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement on the toy VLM")
    p.add_argument("--big-repeats", type=int, default=3, help="timed runs per measurement on the 200M LLaVA")
    p.add_argument("--no-big", action="store_true", help="skip the random ~200M-parameter LLaVA")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Parse `argv`, run `bench_app`, print its result as one JSON line."""
    args = build_parser(prog).parse_args(argv)
    result = bench_app(toy_model=args.model, toy_rankings=args.rankings, repeats=args.repeats,
                       big_repeats=args.big_repeats, big=not args.no_big, threads=args.threads)
    print(json.dumps(result), flush=True)
    return 0


__all__ = ["bench_app", "bench_service", "bench_request", "build_llava_200m", "random_rankings", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
