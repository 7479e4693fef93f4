"""DeepSpeed 0.19.8's ``PartitionedParameterCoordinator`` (runtime/zero/partitioned_param_coordinator.py) for one
rank, as requests to the caching allocator (pure; no torch): which module fetch gathers which parameters, into which
buffers, and when a release frees them. ``core.zero3_requests`` drives it from the trace's module-hook marks.

* a fetch (``fetch_sub_module``) gathers the module's parameters that are not available (``__all_gather_params`` ->
  ``all_gather_coalesced``): one alone into b N c that becomes the parameter (``_all_gather_sequential``), several
  into one flat b N sum(c) (``_all_gather_dtype``), whose first wait (``AllGatherCoalescedHandle.wait``) makes each
  member's own b p copy (``torch.cat``); the flat buffer is freed with the last registry entry that holds it;
* the first forward and backward record the module trace (``record_module``); from the next forward on
  (``reset_step``) each fetch, of a module with parameters or not, is followed by one prefetch bucket: the trace's
  next parameters not available until they pass ``min(max_live - available, prefetch_bucket_size)`` elements;
* a release (``release_sub_module``) frees, before the trace is complete, all the module's parameters; after, those
  ``__params_to_release`` picks: not persistent, not already prefetched for a later use, not used again within
  ``max_reuse_distance`` elements of the trace (cached per module and step, as DeepSpeed's ``lru_cache`` is);
* on one rank nothing is gathered: a parameter is a view of its partition (``_no_gather_coalesced``);
* the gathers of a fetch or prefetch are made on the all-gather stream (``stream(self.__allgather_stream)``) with
  ``overlap_comm``, else on the default stream.

b = 2 bytes, p a parameter's elements, c = ceil(p / N) its partition.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zeroest.estimator.core.zero12_requests import BF16

if TYPE_CHECKING:
    from zeroest.estimator.core.request_types import ModuleSpec, RequestSpec, Sequence

AG_STREAM = 1
"""The coordinator's all-gather stream: its own pools."""
RS_STREAM = 2
"""Stage 3's reduce-and-partition stream (``reduce_and_partition_stream``): its own pools."""


@dataclass(eq=False)
class Param:
    """One parameter as the coordinator tracks it: p, c, whether it stays gathered (``ds_persist``), its status
    (na, inflight, available), the key of the request that holds its gathered copy, the modules using it."""

    name: str
    numel: int
    part: int
    persistent: bool
    status: str = "na"
    key: tuple | None = None
    active: set = field(default_factory=set)


@dataclass(eq=False)
class _Handle:
    """One all-gather's handle: its parameters, its flat buffer (None for one parameter alone), the registry entries
    left that hold it, and whether its first wait has made the members' copies."""

    params: list
    flat: tuple | None
    left: int
    done: bool = False


class Coordinator:
    """``PartitionedParameterCoordinator`` for one rank: fetches, prefetches and releases as requests."""

    def __init__(self, seq: Sequence, params: dict[str, Param], modules: dict[str, ModuleSpec],
                 spec: RequestSpec) -> None:
        self.seq, self.params, self.spec = seq, params, spec
        self.ds_id = {name: i for i, name in enumerate(params)}
        """The order parameters were converted in (``named_parameters``): the coordinator sorts by it."""
        self.of = {key: [params[n] for n in m.params] for key, m in modules.items()}
        self.own = {key: [params[n] for n in m.own] for key, m in modules.items()}
        self.world = spec.world
        self.stream = AG_STREAM if spec.overlap else 0
        """``overlap_comm`` off: DeepSpeed gathers on the default stream (parameter_offload.py)."""
        self.order: list[str] = []
        self.trace: list[tuple[Param, int]] = []
        self.complete = False
        self.inflight: dict[Param, _Handle] = {}
        self.serial = 0
        self.backward_active: dict[str, None] = {}
        self.holders: dict[tuple, int] = {}
        """Gathered storages autograd holds a saved view of, and how many (``hold``)."""
        self.orphans: set[tuple] = set()
        """Released storages still held: freed when the last view is dropped."""
        self.saved: dict[Param, list[tuple]] = {}
        self._release_cache: dict[tuple[str, int], set] = {}
        self.reset()

    def reset(self) -> None:
        """``reset_step`` at a forward's start: the trace completed after the first forward and backward."""
        for param in list(self.inflight):
            self._wait(param)
            self._release(param)
        self.inflight.clear()
        if self.order and not self.complete:
            self.complete = True  # construct_parameter_trace_from_module_trace
            self.trace = [(p, step) for step, key in enumerate(self.order)
                          for p in sorted(set(self.of[key]), key=lambda q: self.ds_id[q.name])]
        self.queue = deque(self.trace) if self.complete else deque()
        self.recent: dict[Param, int] = {}
        self.step_id = 0
        self.available = 0

    def _gather(self, params: list[Param]) -> None:
        """``__all_gather_params``: those not available, gathered on the all-gather stream."""
        todo = sorted((p for p in params if p.status == "na"), key=lambda p: self.ds_id[p.name])
        if not todo:
            return
        self.available += sum(p.numel for p in todo)
        self.serial += 1
        if self.world == 1:  # _no_gather_coalesced: each parameter a view of its partition, nothing allocated
            for p in todo:
                p.status, p.key = "inflight", None
                self._drop_entry(p)
                self.inflight[p] = _Handle([p], None, 1, done=True)
            return
        if len(todo) == 1:  # alone: its buffer becomes the parameter
            todo[0].key = ("gathered", todo[0].name, self.serial)
            self.seq.alloc(todo[0].key, BF16 * self.world * todo[0].part, self.stream)
            handle = _Handle(todo, None, 1, done=True)
        else:
            flat = ("flat", self.serial)
            self.seq.alloc(flat, BF16 * self.world * sum(p.part for p in todo), self.stream)
            handle = _Handle(todo, flat, len(todo))
        for p in todo:
            p.status = "inflight"
            self._drop_entry(p)
            self.inflight[p] = handle

    def _drop_entry(self, param: Param) -> None:
        """A parameter gathered again while an older bucket's entry for it is still registered: the entry is
        replaced, and the older flat buffer freed with its last entry."""
        old = self.inflight.pop(param, None)
        if old is not None:
            old.left -= 1
            if old.left == 0 and old.flat is not None:
                self.seq.free(old.flat)

    def _wait(self, param: Param) -> None:
        handle = self.inflight.pop(param)
        if not handle.done:  # the first wait copies every member out of the flat buffer
            for p in handle.params:
                self.serial += 1
                p.key = ("gathered", p.name, self.serial)
                self.seq.alloc(p.key, BF16 * p.numel, self.stream)
                p.status = "available"
            handle.done = True
        if param.status == "inflight":
            param.status = "available"
        handle.left -= 1
        if handle.left == 0 and handle.flat is not None:
            self.seq.free(handle.flat)

    def _release(self, param: Param) -> None:
        if param.status == "available" and not param.active:
            if self.holders.get(param.key):
                self.orphans.add(param.key)  # autograd still holds a view of it: freed at the last drop
            else:
                self.seq.free(param.key)
            param.status, param.key = "na", None
            self.available -= param.numel

    def hold(self, key: str, index: int, *, held: bool) -> None:
        """A saved view of the module's parameter ``index`` (``trace.zero3_hooks.ParamHolds``): its gathered storage
        outlives the release until backward drops the last such view."""
        own = self.own.get(key, [])
        param = own[index] if index < len(own) else None
        if param is None:
            return
        stack = self.saved.setdefault(param, [])
        if held:
            if param.key is not None:
                stack.append(param.key)
                self.holders[param.key] = self.holders.get(param.key, 0) + 1
            return
        if not stack:
            return
        storage = stack.pop()
        self.holders[storage] -= 1
        if self.holders[storage] == 0:
            del self.holders[storage]
            if storage in self.orphans:
                self.orphans.discard(storage)
                self.seq.free(storage)

    def external(self, key: str, parent: str) -> None:
        """peft's read of ``lora_A.weight`` in the LoRA layer's forward, before ``lora_A`` runs
        (``ZeROOrderedDict.__getitem__``): the weight becomes an external parameter of the LoRA layer
        (``register_external_parameter``: its fetches and releases, and the module trace, count it from then on),
        and one not available is gathered whole on the default stream."""
        for p in self.of[key]:
            if p not in self.of[parent]:
                self.of[parent].append(p)
            if p.status == "na":
                self.serial += 1
                p.key = ("external", p.name, self.serial)
                self.seq.alloc(p.key, BF16 * self.world * p.part)
                p.status = "available"

    def fetch(self, key: str, *, forward: bool) -> None:
        if not self.complete:
            self.order.append(key)
        if not forward:
            self.backward_active[key] = None
        wanted = self.of[key]
        self._gather(wanted)
        for p in wanted:
            p.active.add(key)
            if p in self.inflight:
                self._wait(p)
        if self.complete:
            self._prefetch(wanted)
        self.step_id += 1

    def _prefetch(self, wanted: list[Param]) -> None:
        pending = {p for p in wanted if self.recent.get(p, -10**10) < self.step_id}
        popped: set = set()
        while self.queue and len(popped) < len(pending):
            p, step = self.queue.popleft()
            self.recent[p] = step
            popped.add(p)
        budget = min(self.spec.max_live - self.available, self.spec.prefetch_elements)
        chosen: list[Param] = []
        numel = 0
        while self.queue and numel < budget:
            p, step = self.queue.popleft()
            if p.status == "na" and p not in chosen:
                chosen.append(p)
                numel += p.numel
            self.recent[p] = max(self.recent.get(p, -10**10), step)
        if chosen:
            self._gather(chosen)

    def _to_release(self, key: str) -> set:
        """``__params_to_release`` (cached per module and step, as DeepSpeed's ``lru_cache`` does)."""
        cached = self._release_cache.get((key, self.step_id))
        if cached is not None:
            return cached
        out = {p for p in self.of[key] if not p.persistent}
        out -= {p for p in self.of[key] if self.recent.get(p, -10**10) > self.step_id}
        walked = 0
        for later in self.order[self.step_id:]:
            if walked >= self.spec.reuse_distance:
                break
            for p in self.of[later]:
                out.discard(p)
                walked += p.numel
        self._release_cache[(key, self.step_id)] = out
        return out

    def release(self, key: str, *, forward: bool) -> None:
        chosen = self._to_release(key) if self.complete else set(self.of[key])
        if not forward:
            self.backward_active.pop(key, None)
        for p in self.of[key]:
            p.active.discard(key)
            if p in chosen:
                self._release(p)

    def leftovers(self) -> None:
        """``release_backward_leftovers``: modules whose post-backward hook never ran."""
        for key in reversed(list(self.backward_active)):
            for p in self.of[key]:
                p.active.discard(key)
                if not p.persistent:
                    self._release(p)
        self.backward_active.clear()

    def release_all(self) -> None:
        """``_partition_all_parameters`` at the step: in-flight gathers waited on, every parameter released."""
        for p in list(self.inflight):
            if p in self.inflight:
                self._wait(p)
        for p in self.params.values():
            p.active.clear()
            self._release(p)
