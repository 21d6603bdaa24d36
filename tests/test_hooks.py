"""Hook plumbing (`hooks.HookRegistry`, row views): installed once while any block is open, removed
when the last closes (also on error), and each thread/task sees only its own block's value."""

import threading

import pytest
import torch

from hones_core.hooks import HookRegistry, RefCountedHooks, RowView, model_key, row_view, row_views, set_row_view
from hones_core.interventions import Plan, intervene
from hones_core.sharing import _decoder_layers, share_rows


class _Recorder(RefCountedHooks):
    """One pre-hook on `module` that records, per call, the value its registry holds for this context."""

    def __init__(self, registry: HookRegistry, module: torch.nn.Module):
        super().__init__(id(module))
        self.registry, self.module = registry, module
        self.installs = 0
        self.seen: list = []

    def install(self) -> list:
        self.installs += 1
        return [self.module.register_forward_pre_hook(lambda module, args: self.seen.append(
            (threading.get_ident(), self.registry.current(self.key))))]


def _setup():
    registry: HookRegistry[_Recorder] = HookRegistry("test_hooks")
    module = torch.nn.Linear(4, 4)
    made: list[_Recorder] = []

    def factory():
        made.append(_Recorder(registry, module))
        return made[-1]
    return registry, module, made, factory


def test_hooks_are_installed_once_while_any_block_is_open_and_removed_after_the_last():
    registry, module, made, factory = _setup()
    assert not module._forward_pre_hooks and registry.users(module) == 0
    with registry.open(module, factory, "outer") as holder:
        assert len(module._forward_pre_hooks) == 1 and registry.users(module) == 1
        with registry.open(module, factory, "inner") as again:
            assert again is holder and len(module._forward_pre_hooks) == 1 and registry.users(module) == 2
            module(torch.zeros(1, 4))
        assert len(module._forward_pre_hooks) == 1 and registry.users(module) == 1
        module(torch.zeros(1, 4))
    assert not module._forward_pre_hooks and registry.users(module) == 0
    module(torch.zeros(1, 4))                            # no hook: nothing recorded
    assert [value for _, value in holder.seen] == ["inner", "outer"]
    assert len(made) == 1 and holder.installs == 1      # one holder per module, installed once
    with registry.open(module, factory, "later"):
        assert len(module._forward_pre_hooks) == 1
    assert len(made) == 1 and holder.installs == 2 and not module._forward_pre_hooks


def test_hooks_are_removed_when_a_block_raises():
    registry, module, made, factory = _setup()
    with pytest.raises(RuntimeError, match="boom"):
        with registry.open(module, factory, 1):
            raise RuntimeError("boom")
    assert not module._forward_pre_hooks and registry.users(module) == 0 and registry.current(id(module)) is None
    with registry.open(module, factory, "outer"):
        with pytest.raises(RuntimeError, match="inner"):
            with registry.open(module, factory, "inner"):
                raise RuntimeError("inner")
        # the outer block is still open: its hooks stay, and it sees its own value again
        assert len(module._forward_pre_hooks) == 1 and registry.users(module) == 1
        assert registry.current(id(module)) == "outer"
    assert not module._forward_pre_hooks and registry.users(module) == 0


def test_a_failing_install_leaves_nothing_behind():
    registry, module, _, _ = _setup()

    class Broken(RefCountedHooks):
        def install(self):
            raise RuntimeError("cannot install")

    with pytest.raises(RuntimeError, match="cannot install"):
        with registry.open(module, lambda: Broken(id(module)), 1):
            pass
    assert registry.users(module) == 0 and registry.current(id(module)) is None and not module._forward_pre_hooks


def test_threads_see_only_their_own_value():
    registry, module, made, factory = _setup()
    inside = threading.Barrier(3)       # two threads in their blocks, and one outside every block
    ran = threading.Barrier(3)
    errors: list[BaseException] = []

    def in_block(value):
        try:
            with registry.open(module, factory, value):
                inside.wait()
                for _ in range(5):
                    module(torch.zeros(1, 4))
                    assert registry.current(id(module)) == value
                ran.wait()
        except BaseException as err:      # re-raised in the main thread below
            errors.append(err)

    def outside():
        try:
            inside.wait()
            assert len(module._forward_pre_hooks) == 1       # installed by the others ...
            module(torch.zeros(1, 4))                        # ... but this context opened no block
            assert registry.current(id(module)) is None and not registry.is_open(id(module))
            ran.wait()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=in_block, args=("a",)), threading.Thread(target=in_block, args=("b",)),
               threading.Thread(target=outside)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    by_thread: dict[int, set] = {}
    for ident, value in made[0].seen:
        by_thread.setdefault(ident, set()).add(value)
    assert len(by_thread) == 3          # alive together, so three distinct idents
    assert {frozenset(v) for v in by_thread.values()} == {frozenset({None}), frozenset({"a"}), frozenset({"b"})}
    assert [v for _, v in made[0].seen].count("a") == [v for _, v in made[0].seen].count("b") == 5
    assert len(made) == 1 and made[0].installs == 1 and not module._forward_pre_hooks


def test_row_views_are_per_layer_and_undone_when_the_block_exits(tiny_vlm):
    arch = tiny_vlm("llava").arch
    key = model_key(arch)
    assert key == id(arch.layers[0].o_proj)
    view = RowView(1, torch.tensor([0, 2]), torch.tensor([0, 0, 1]))
    seen: list = []
    with row_views(arch):
        set_row_view(arch, view)
        assert row_view(key, 1) is view and row_view(key, 0) is None
        thread = threading.Thread(target=lambda: seen.append(row_view(key, 1)))    # other contexts: no view
        thread.start()
        thread.join()
        set_row_view(arch, None)
        assert row_view(key, 1) is None
        set_row_view(arch, view)
    assert row_view(key, 1) is None and seen == [None]


def test_interventions_and_sharing_install_their_hooks_once_on_a_real_model(tiny_vlm, images, prompts):
    vlm = tiny_vlm("llava")
    o_proj, layer = vlm.arch.layers[0].o_proj, _decoder_layers(vlm.arch)[0]

    def counts():
        return len(o_proj._forward_pre_hooks), len(layer._forward_pre_hooks), len(layer._forward_hooks)

    before = counts()
    assert before == (0, 0, 0)
    with intervene(vlm.arch, Plan()), share_rows(vlm.arch):
        with intervene(vlm.arch, Plan.ablate_heads([(0, 1)])), share_rows(vlm.arch):
            assert counts() == (1, 1, 1)
        assert counts() == (1, 1, 1)
    assert counts() == before
    with pytest.raises(ValueError, match="per-row plans"):
        with intervene(vlm.arch, [Plan(), Plan(), Plan()]), share_rows(vlm.arch):
            vlm.next_token_logits(images, prompts)          # 2 rows, 3 plans: refused inside the block
    assert counts() == before
