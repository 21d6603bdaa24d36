"""Hook plumbing shared by interventions and row sharing: hooks that are safe under concurrency.

PyTorch hooks live on modules, which every thread shares; what a hook should do is per
request. So each kind of hook (plans on `o_proj`/`down_proj`, vision-tower sharing,
decoder-prefix sharing) follows one pattern, implemented once by `HookRegistry.open`:

- the hooks of one model (or module) are held by one `RefCountedHooks` object, created on
  first use and kept per module in a weak table;
- the first open block installs them, the last block to close removes them (also when the
  block raises), under the registry's lock; no lock is held during forward passes;
- each block records its value (a compiled plan, or "sharing on") under the holder's key in
  a `contextvars.ContextVar`, so a hook acts only for the threads/tasks inside a block, and
  each of them sees only its own value. A hook finding no value does nothing.

Row views: when a decoder layer runs on some of the batch's rows only (the distinct ones,
see `sharing.share_prefix`), whoever runs it sets a `RowView` for that layer with
`set_row_view`, also per context; hooks on the layer's modules read it with `row_view`
to pick the rows they hold.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from .arch import Architecture


def model_key(arch: Architecture) -> int:
    """The key of `arch`'s model in the per-context tables (plans, row views)."""
    return id(arch.layers[0].o_proj)


class RefCountedHooks:
    """Hooks installed by the first open block and removed when the last one closes.

    Subclasses say what to install (`install` returns the handles). `key` names the model or
    module in the registry's per-context table. Callers serialise `acquire`/`release` with
    their own lock (`HookRegistry.open` does).
    """

    def __init__(self, key: int):
        self.key = key
        self.users = 0
        self.handles: list = []

    def install(self) -> list:
        raise NotImplementedError

    def acquire(self) -> None:
        if self.users == 0:
            self.handles = self.install()
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()


H = TypeVar("H", bound=RefCountedHooks)


class HookRegistry(Generic[H]):
    """One kind of hooks: their holders (one per anchor module) and what each context asked of them.

    `open(anchor, factory, value)` is the only way in: get or create the anchor's holder,
    acquire it (installing its hooks if no block is open), record `value` under the holder's key
    for this context, and undo both on exit. The holder's hooks read `current(key)`.
    """

    def __init__(self, name: str):
        # weak: a model that is dropped takes its holder with it
        self._holders: weakref.WeakKeyDictionary[torch.nn.Module, H] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._active: contextvars.ContextVar[dict[int, Any]] = contextvars.ContextVar(name, default={})

    def current(self, key: int) -> Any | None:
        """The value the innermost open block of this context gave `key`; None outside every block."""
        return self._active.get().get(key)

    def is_open(self, key: int) -> bool:
        """Whether this context is inside a block for `key`."""
        return key in self._active.get()

    def users(self, anchor: torch.nn.Module) -> int:
        """Blocks open for `anchor` in all threads together (0 when none: its hooks are removed)."""
        with self._lock:
            holder = self._holders.get(anchor)
            return 0 if holder is None else holder.users

    @contextmanager
    def open(self, anchor: torch.nn.Module, factory: Callable[[], H], value: Any = True) -> Iterator[H]:
        """A block in which the hooks held for `anchor` are installed and see `value` in this context.

        `factory()` makes the holder on first use of `anchor`; later blocks reuse it. Nested
        blocks for one key shadow the outer value until they close. Yields the holder.
        """
        with self._lock:
            holder = self._holders.get(anchor)
            if holder is None:
                holder = self._holders[anchor] = factory()
            holder.acquire()
        # a new dict each time: other contexts keep seeing the dict they had
        token = self._active.set({**self._active.get(), holder.key: value})
        try:
            yield holder
        finally:
            self._active.reset(token)
            with self._lock:
                holder.release()


# ----- row views: a layer running on some rows only ------------------------------------------------

@dataclass(frozen=True)
class RowView:
    """A decoder layer is running on `keep` (long `[kept]`) of the batch's rows; `inverse` (long
    `[rows]`) says which kept row stands for each row. Set by `sharing.share_prefix`."""
    layer: int
    keep: torch.Tensor
    inverse: torch.Tensor


_VIEWS: contextvars.ContextVar[dict[int, RowView]] = contextvars.ContextVar("hones_row_views", default={})


def row_view(key: int, layer: int) -> RowView | None:
    """The row view this context set for layer `layer` of the model `key` (`model_key`), if any."""
    view = _VIEWS.get().get(key)
    return view if view is not None and view.layer == layer else None


def set_row_view(arch: Architecture, view: RowView | None) -> None:
    """Tell the hooks of `arch` that the layer `view.layer` now runs on some rows only (None: all rows)."""
    key = model_key(arch)
    views = _VIEWS.get()
    if view is None and key not in views:
        return
    views = {k: v for k, v in views.items() if k != key}
    if view is not None:
        views[key] = view
    _VIEWS.set(views)


@contextmanager
def row_views(arch: Architecture) -> Iterator[None]:
    """A block in which row views of `arch` may be set; whatever is set is undone when it exits."""
    token = _VIEWS.set({k: v for k, v in _VIEWS.get().items() if k != model_key(arch)})
    try:
        yield
    finally:
        _VIEWS.reset(token)
