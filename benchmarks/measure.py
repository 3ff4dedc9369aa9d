"""Timing (interleaved A/B, medians) and peak-memory measurement on CPU and CUDA.

Clocks: on a GPU, wall time (synchronised). On a CPU shared with other processes, wall time measures the neighbours
as much as the model (with 2 torch threads on 2 busy cores one batch-8 `generate` took anywhere from 3 s to 86 s),
so CPU configs may time the process's CPU time instead (`"timer": "process_cpu"`, best with 1 torch thread, where it
is the CPU time of the computation itself and time slices given to other processes do not count). Both clocks are
recorded for every call.

Peak memory, the same definition on both devices:
    peak = resident bytes of what is being measured (model parameters and buffers; for a training step also the
           optimizer state) + the highest number of bytes the call had allocated at any moment beyond what was
           allocated when it started (its transient peak).
- CUDA: transient peak = `torch.cuda.max_memory_allocated()` - `torch.cuda.memory_allocated()` at the start
  (after `reset_peak_memory_stats`).
- CPU: `LiveTensorBytes`, a dispatcher mode that sees every tensor an operator creates, adds its storage's bytes
  when it is created and takes them off when the storage is freed; the maximum of that running sum is the transient
  peak. Unlike RSS this is exact, independent of glibc's caching and of other threads' Python objects; unlike
  `tracemalloc` it sees tensor memory. It gives the same numbers as summing `torch.profiler`'s memory events (checked
  on `cpu-small`: equal to 0.1 MiB for every model and batch size) without the profiler's own records, which grew by
  gigabytes over one 128-token `generate` at the 7B shape and ran a 24 GB machine out of memory. Temporaries that a
  single kernel allocates and frees internally are not seen (on `cpu-small` they did not move the peak). Memory is
  measured in a separate run from the timings.
"""

import ctypes
import ctypes.util
import itertools
import statistics
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


CLOCKS = ("wall", "process_cpu")
# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 32) -> str:
    """
    Makes glibc malloc keep freed memory for reuse (as a GPU caching allocator does): blocks up to `mmap_threshold`
    come from the heap instead of fresh `mmap`s, and the heap is not trimmed back to the OS below `trim_threshold`.
    Without it, the KV cache that `generate` grows by `torch.cat` every step lands on fresh pages in some calls and
    reused ones in others, depending on what ran before: page faults (system time) that differ between the compared
    variants for reasons that have nothing to do with them. Returns what was done, for the results' metadata.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        raise RuntimeError("keep_freed_memory needs glibc (Linux); set the config's keep_freed_memory to false.")
    libc = ctypes.CDLL(name)
    if not (libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)):
        raise RuntimeError("glibc mallopt refused the thresholds; set the config's keep_freed_memory to false.")
    return f"glibc mallopt: M_MMAP_THRESHOLD={mmap_threshold}, M_TRIM_THRESHOLD={trim_threshold}"


@dataclass
class TimingResult:
    """
    Seconds of each repeat, per variant, measured interleaved, on two clocks: wall (`time.perf_counter`) and the
    process's CPU time (`time.process_time`). `clock` names the one the medians and ratios use.

    Ratios are medians of *paired* ratios: variants of one repeat ran back to back, so each repeat gives one ratio
    that slow changes of the machine (other processes on shared cores) affect little; `ratio_spread` gives their
    range.
    """

    clock: str
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def times(self, name: str) -> list[float]:
        return (self.wall if self.clock == "wall" else self.cpu)[name]

    def median(self, name: str) -> float:
        return statistics.median(self.times(name))

    def paired_ratios(self, name: str, baseline: str) -> list[float]:
        return [t / b for t, b in zip(self.times(name), self.times(baseline))]

    def ratio(self, name: str, baseline: str) -> float:
        """Median over repeats of `name`'s time / `baseline`'s time."""
        return statistics.median(self.paired_ratios(name, baseline))

    def ratio_spread(self, name: str, baseline: str) -> tuple[float, float]:
        ratios = self.paired_ratios(name, baseline)
        return min(ratios), max(ratios)

    def to_dict(self) -> dict:
        return {
            name: {
                "clock": self.clock,
                "median_s": self.median(name),
                "min_s": min(self.times(name)),
                "max_s": max(self.times(name)),
                "wall_runs_s": self.wall[name],
                "process_cpu_runs_s": self.cpu[name],
            }
            for name in self.wall
        }


def synchronize(device: str):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str) -> tuple[float, float]:
    """`(wall seconds, process CPU seconds)` of one `fn()` call, device work included."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_interleaved(variants: dict, repeats: int, warmup: int, device: str, clock: str, progress=None) -> TimingResult:
    """
    Times every variant `repeats` times, interleaved (A B C, then C B A, ...: alternating order so that slow drifts
    of the machine hit every variant alike), after `warmup` untimed calls of each.

    Args:
        variants: `{name: zero-argument callable}`.
        clock: `"wall"` or `"process_cpu"` (see `TimingResult`).
        progress: optional tqdm bar, advanced once per timed call.
    """
    if clock not in CLOCKS:
        raise ValueError(f"Unknown clock {clock!r}; accepted: {', '.join(CLOCKS)}.")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    result = TimingResult(clock, {name: [] for name in names}, {name: [] for name in names})
    for repeat in range(repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            wall, cpu = time_call(variants[name], device)
            result.wall[name].append(wall)
            result.cpu[name].append(cpu)
            if progress is not None:
                progress.update(1)
    return result


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (shared or tied weights counted once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def model_bytes(model) -> int:
    """Parameter and buffer bytes of `model`."""
    return tensor_bytes(itertools.chain(model.parameters(), model.buffers()))


def optimizer_state_bytes(optimizer) -> int:
    return tensor_bytes(
        value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)
    )


class OpSeconds(TorchDispatchMode):
    """CPU seconds of the calling thread spent inside torch ops (each op's dispatch timed with `time.thread_time`,
    which other processes on shared cores do not inflate), and the number of ops."""

    def __init__(self):
        super().__init__()
        self.seconds, self.ops = 0.0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.thread_time() - start
        self.ops += 1
        return out


class LiveTensorBytes(TorchDispatchMode):
    """
    Bytes of the tensor storages that operators created inside the block and that are still alive: `live` now,
    `peak` at most. Outputs that alias an input (views, in-place and `out=` operators) create nothing and are skipped.

        with LiveTensorBytes() as tracker:
            model.generate(...)
        tracker.peak
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._bytes_by_pointer = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if all(result.alias_info is None for result in func._schema.returns):
            for leaf in tree_leaves(output):
                if isinstance(leaf, torch.Tensor):
                    self._track(leaf.untyped_storage())
        return output

    def _track(self, storage):
        pointer, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or pointer in self._bytes_by_pointer:  # several outputs of one operator may share a storage
            return
        self._bytes_by_pointer[pointer] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, pointer)

    def _release(self, pointer):
        self.live -= self._bytes_by_pointer.pop(pointer)


def transient_peak_bytes(fn, device: str) -> int:
    """Highest bytes allocated by `fn()` beyond what was allocated when it started (see the module docstring)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


def peak_memory(fn, device: str, resident_bytes: int) -> dict:
    """`{"resident_bytes", "transient_peak_bytes", "peak_bytes"}` of one `fn()` call."""
    transient = transient_peak_bytes(fn, device)
    return {"resident_bytes": resident_bytes, "transient_peak_bytes": transient, "peak_bytes": resident_bytes + transient}
