"""--preset: the official configs' values, flags given on the command line win, everything recorded."""

import pytest

from hones_core import cli, presets


def parsed(argv):
    args = cli.build_parser().parse_args(argv)
    args.preset_info = presets.apply(args, argv)
    return args


def test_a_flag_given_overrides_the_preset_and_every_value_is_recorded():
    argv = ["mask-eval", "--model", "m", "--data", "d", "--rankings", "r", "--task", "vqa", "--preset", "paper-qwen",
            "--limit", "7", "--seed=5"]
    args = parsed(argv)
    assert (args.limit, args.seed, args.n_negatives, args.top_ratio) == (7, 5, 49, 0.01)
    assert args.preset_info == {"name": "paper-qwen", "model": "Qwen/Qwen2.5-VL-7B-Instruct",
                                "values": {"seed": 5, "n_negatives": 49, "top_ratio": 0.01, "limit": 7,
                                           "max_new_tokens": 24}}
    rank = parsed(["rank", "--model", "m", "--data", "d", "--task", "all", "--out", "o", "--preset", "paper-llava"])
    assert (rank.top_heads, rank.limit, rank.seed) == (30, 5000, 3407)
    plain = parsed(["rank", "--model", "m", "--data", "d", "--task", "all", "--out", "o"])
    assert plain.preset_info is None and plain.top_heads is None and plain.n_negatives == 49 and plain.seed == 0


def test_abbreviated_flags_are_refused_so_a_preset_cannot_silently_win():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["rank", "--model", "m", "--data", "d", "--task", "all", "--out", "o",
                                       "--top-h", "3"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["rank", "--model", "m", "--data", "d", "--task", "all", "--out", "o",
                                       "--preset", "paper-gpt"])
