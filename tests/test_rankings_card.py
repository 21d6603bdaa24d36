"""The dataset card of a rankings artifact."""

from __future__ import annotations

import yaml

from hones_core import rankings as R

from conftest import RANKINGS_SHAPE, make_rankings

L, H, I = RANKINGS_SHAPE


def test_dataset_card(tmp_path):
    artifact = make_rankings("vqa", "caption")
    card = R.dataset_card(artifact, {"figures/overlap.png": "Cross-task overlap of the top 1 %"})
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"license": "mit", "pretty_name": "HONES rankings for llava-hf/llava-1.5-7b-hf",
                     "tags": ["hones", "interpretability", "vision-language"]}
    for text in ("llava-hf/llava-1.5-7b-hf", "`abc123`", "`llava`", f"{L} layers x {H} heads",
                 f"{I} FFN neurons", "| vqa | 2.1, 0.3 | 2 |", "yes: unconditioned DVP", "- top_heads: `2`",
                 "- file: `disc.jsonl`", '- items: `{"vqa": 8}`',
                 "![Cross-task overlap of the top 1 %](figures/overlap.png)"):
        assert text in card, text
    assert R.save(artifact, tmp_path / "a").joinpath("README.md").read_text() == R.dataset_card(artifact)
