"""Several processes, one result: which batches a process runs, and exact sum reductions.

Ranking and masking evaluation can run in several processes started by Hugging Face
`accelerate launch` (or `torchrun`); `accelerate`'s `PartialState` sets up
torch.distributed (NCCL on GPUs, gloo on CPUs). Work is dealt out by *batch*: the rows of
a stage are cut into batches exactly as one process would cut them, and batch k goes to
process k mod P. Every batch therefore holds the same rows whatever P is, so each row's
numbers are the ones a single process computes. Each process adds up the quantities HONES
averages over its batches (metric statistics per plan, DVP sums per layer and neuron,
IDF document counts), the partial sums are all-reduced in float64, and only then are
ratios, positive parts and top-K taken. Results do not depend on the number of processes
beyond float64 rounding of the final additions.

Started without a launcher, `current()` is one process and every reduction is the identity.
A process that called `current()` ends with `shutdown()` (the CLI does it for every command).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among `count` processes (`index` 0 is the main process)."""
    index: int = 0
    count: int = 1
    device: str | None = None        # the device the launcher gave this process (None: choose as usual)
    local_index: int = 0             # index among the processes of this machine

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"process {self.index} of {self.count} is not a valid shard")

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.count > 1

    def batches(self, n: int, batch_size: int) -> list[range]:
        """The batches of `range(n)` (cut every `batch_size`) that this process runs."""
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        starts = range(0, n, batch_size)
        return [range(s, min(s + batch_size, n)) for k, s in enumerate(starts) if k % self.count == self.index]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes, in float64 (a new tensor on the CPU)."""
        total = tensor.detach().to("cpu", torch.float64).clone()
        if self.distributed:
            from accelerate.utils import reduce

            device = _collective_device()
            total = reduce(total.to(device), reduction="sum").to("cpu")
        return total

    def barrier(self) -> None:
        if self.distributed:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors, gloo CPU tensors."""
    from accelerate import PartialState

    state = PartialState()
    return state.device if state.backend == "nccl" else torch.device("cpu")


def launched() -> bool:
    """True when this process was started by `accelerate launch` / `torchrun` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current(*, cpu: bool | None = None) -> Shard:
    """This process's `Shard`: set up torch.distributed through accelerate when launched, else one process.

    Args:
        cpu: use CPUs (gloo) even where CUDA is available; default: CPUs only when there is no CUDA.
    """
    if not launched():
        return Shard()
    from accelerate import PartialState

    # Imported before the group exists: its functions take `group=group.WORLD` as a default argument,
    # evaluated at import. Imported later (transformers does, while loading a model), they would keep
    # the default group alive after `shutdown()` destroys it, and with it gloo's threads.
    import torch.distributed.nn.functional  # noqa: F401

    if cpu is None:
        cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"the launcher started {os.environ['WORLD_SIZE']} processes but accelerate set up "
                           f"{state.num_processes}; check the launch command (accelerate launch --num_processes N)")
    return Shard(state.process_index, state.num_processes, device=str(state.device),
                 local_index=state.local_process_index)


def shutdown(*, wait: bool = True) -> None:
    """End torch.distributed in this process if it was set up (a no-op otherwise): call it once, at the end.

    Without it the process group lives until interpreter exit, and so do gloo's worker threads.
    One of them may still hold the last collective's work, with the tensors of a Python
    `torch.Tensor`; freeing them takes the GIL, and a thread asking for the GIL while Python
    finalizes is ended with `pthread_exit`, whose unwinding through a C++ destructor calls
    `std::terminate` ("terminate called without an active exception", SIGABRT). Destroying the
    group frees it, which joins those threads while Python still runs (as long as nothing else
    holds the group: see the import in `current()`).

    Args:
        wait: first wait for every process (a barrier), so that no process leaves while another
            still needs it. Pass False on an error: the other processes may be inside a collective
            that the barrier would not match; the group is then only destroyed, a local step.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def take(items: Sequence[T], rows: Sequence[range]) -> list[T]:
    """The items of the given batches, in order."""
    return [items[i] for batch in rows for i in batch]


def device_placement(shard: Shard, *, device: str | None, device_map: str | None,
                     gpus_per_process: int | None) -> dict:
    """Where this process loads its model: keyword arguments for `models.load_vlm`.

    - one process, or one GPU per process: `device` (default: the launcher's device for
      this process, i.e. its own GPU, or the CPU);
    - `device_map="auto"`: the model is split over this process's GPUs, the `gpus_per_process`
      consecutive GPUs starting at local index × gpus_per_process (all visible GPUs when
      one process runs alone and `gpus_per_process` is not given).
    """
    if device_map is None:
        if gpus_per_process is not None:
            raise ValueError("--gpus-per-process only applies with --device-map auto")
        if device is None and shard.distributed:
            device = shard.device
        return {"device": device}
    if device_map != "auto":
        raise ValueError(f"--device-map takes 'auto' (split the model over this process's GPUs), not {device_map!r}")
    if device is not None:
        raise ValueError("give either --device or --device-map auto, not both")
    visible = torch.cuda.device_count()
    if visible == 0:
        if shard.distributed:
            raise ValueError("--device-map auto with several processes needs GPUs; on CPUs run one process per "
                             "machine, or leave out --device-map")
        return {"device_map": "auto"}
    if gpus_per_process is None:
        if shard.distributed:
            raise ValueError("with several processes, --device-map auto needs --gpus-per-process K "
                             "(each process takes K consecutive GPUs)")
        gpus_per_process = visible
    first = shard.local_index * gpus_per_process
    mine = list(range(first, first + gpus_per_process))
    if gpus_per_process < 1 or mine[-1] >= visible:
        raise ValueError(f"process {shard.local_index} on this machine would take GPUs {mine}, but only {visible} "
                         f"are visible: run at most {visible // max(gpus_per_process, 1)} processes per machine "
                         f"with --gpus-per-process {gpus_per_process}")
    memory = {i: int(torch.cuda.mem_get_info(i)[0] * 0.85) for i in mine}   # free memory, room for activations
    return {"device_map": "auto", "max_memory": memory}
