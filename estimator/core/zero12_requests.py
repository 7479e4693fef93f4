"""What ``DeepSpeedZeroOptimizer`` itself asks the caching allocator for at ZeRO stages 1-2 (DeepSpeed 0.19.8's
runtime/zero/stage_1_and_2.py), written into a ``core.request_types.Sequence`` in the order ``core.requests.build``
calls for them (pure; no torch). b is the 16-bit width, P_g a group's trainable parameters, N the ranks:

* ``__init__`` (``optimizer_init``), group by group: ``empty_cache()`` (segments given back, the peak statistics
  restarted), the flat copy of the group (``flatten_dense_tensors_aligned``, b P_g) and its original tensors freed
  (``_update_model_bit16_weights``), the partition's ``.clone().to(fp32)`` (b P_g/N, then 4 P_g/N, or none with
  optimizer offload, where it goes to the host; the clone freed); where the card's free memory is short of the flat
  buffer (``core.capacity``), the group's tensors leave for the host first, another ``empty_cache()`` follows and
  the flat buffer comes back as one block; then with offload ``temp_grad_buffer_for_gpu_offload`` (b n_max, kept),
  without it ``initialize_optimizer_states``' zero fp32 gradient per group (4 P_g/N, made and dropped);
* a flush of the ipg bucket (``Bucket``, ``reduce_ipg_grads``): the flatten of its tensors (``allreduce_bucket``,
  b E) only where they make two slices or more (``average_tensor`` merges consecutive parameters bound for one rank,
  whatever their group); then for each of its parameters in the rank's partition, without offload the copy into
  ``grads_in_partition`` (made at the first flush: b times the elements of every parameter that starts in the
  partition, ``copy_grads_in_partition``), with offload, at the accumulation boundary only, the fp64 copy for its
  norm (``set_norm_for_param_grad_in_gpu``, 8 n) and the fp32 copy for the host
  (``async_inplace_copy_grad_to_fp32_buffer_from_gpu``, 4 n), each made and dropped. With ``overlap_comm`` the
  flatten and ``grads_in_partition`` come from the reduction stream's own pools (``with
  stream(self.reduction_stream)``; ``REDUCTION_STREAM``);
* ``step`` without offload (``optimizer_step``): the fp64 norm of each gradient in the partition
  (``get_grad_norm_direct``, 8 n each, made and dropped); then per group the flat 16-bit gradient partition
  (b P_g/N) and its fp32 copy (4 P_g/N, the first dropped); ``grads_in_partition`` dropped with the last group's
  ``averaged_gradients``; the update's states and temporaries (``UPDATES``); then the fp32 gradient dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zeroest.estimator.core.flat_group import flat_group_numel
from zeroest.estimator.core.vocab import weight_decays

if TYPE_CHECKING:
    from zeroest.estimator.core.request_types import RequestSpec, Sequence, TensorSpec

BF16 = 2
REDUCTION_STREAM = 1
"""The stream DeepSpeed reduces on with ``overlap_comm`` (``self.reduction_stream``): its own pools."""


def param_groups(tensors: list[TensorSpec], param_groups: int) -> list[list[tuple[str, int]]]:
    """The optimizer's parameter groups: one, or weight decay then biases and norms (validate/adapters.py
    ``parameter_groups``, as the HF Trainer groups them)."""
    named = [t for t in tensors if t.trainable]
    if param_groups == 2:
        groups = [[t for t in named if weight_decays(t.name)], [t for t in named if not weight_decays(t.name)]]
    else:
        groups = [named]
    return [[(t.name, t.numel) for t in group] for group in groups if group]


class Bucket:
    """The ipg bucket's flushes in one backward: the requests each flush makes. ``layout``: parameter -> (group,
    first element in the group's flat buffer, elements); ``parts``: each group's partition size; ``in_partition``:
    the elements of each parameter inside the rank's partition; ``touching``: the elements of every parameter that
    starts in it (``grads_in_partition``)."""

    def __init__(self, seq: Sequence, step: int, spec: RequestSpec, layout: dict[str, tuple[int, int, int]],
                 parts: list[int], in_partition: dict[str, int], touching: int, partition_key: tuple, *,
                 boundary: bool = True) -> None:
        self.seq, self.step, self.spec, self.partition_key = seq, step, spec, partition_key
        self.layout, self.parts, self.in_partition, self.touching = layout, parts, in_partition, touching
        self.boundary = boundary
        """The micro-step ends the accumulation: only there does offload copy the partition out (fp64 norm, fp32);
        before it ``async_accumulate_grad_in_cpu_via_gpu`` adds into host buffers through the kept GPU buffer."""
        self.names: list[str] = []
        self.elements = 0
        self.made = False

    def add(self, name: str, numel: int) -> None:
        if self.elements + numel > self.spec.bucket_elements:
            self.flush()
        self.names.append(name)
        self.elements += numel

    def take(self, name: str, numel: int, key) -> None:
        """DeepSpeed's hook (``reduce_independent_p_g_buckets_and_remove_grads``): the gradient stored under ``key``
        is copied into the bucket and its own storage dropped."""
        self.add(name, numel)
        self.seq.free(key)

    def _slices(self) -> int:
        """The slices ``average_tensor`` reduces: each parameter's piece per partition it touches, the pieces of
        consecutive parameters bound for the same rank being one slice, whatever their group (its
        ``rank_and_offsets`` merge compares the partition id, the process group and the copy ranks)."""
        keys: list[int] = []
        for name in self.names:
            group, start, numel = self.layout.get(name, (0, 0, 0))
            part = max(1, self.parts[group]) if self.parts else 1
            for dst in range(start // part, (start + max(numel, 1) - 1) // part + 1):
                if not (keys and keys[-1] == dst):
                    keys.append(dst)
        return len(keys)

    def flush(self) -> None:
        stream = REDUCTION_STREAM if self.spec.overlap else 0
        if self._slices() > 1:  # allreduce_bucket's flatten; one tensor is flattened as a view
            self.seq.temp(("flatten", self.step, len(self.seq.ops)), BF16 * self.elements, stream)
        for name in self.names:
            in_partition = self.in_partition.get(name, 0)
            if in_partition <= 0:
                continue
            if self.spec.offload:
                if not self.boundary:
                    continue
                self.seq.temp(("norm64", self.step, name), 8 * in_partition)
                self.seq.temp(("to_fp32", self.step, name), 4 * in_partition)
            elif not self.made:
                self.seq.alloc(self.partition_key, BF16 * self.touching, stream)
                self.made = True
        self.names.clear()
        self.elements = 0


def optimizer_init(seq: Sequence, groups: list[list[tuple[str, int]]], spec: RequestSpec):
    """``DeepSpeedZeroOptimizer.__init__``'s requests; (layout, parts, in_partition, touching) of ``Bucket``."""
    world = spec.world
    parts: list[int] = []
    in_partition: dict[str, int] = {}
    layout: dict[str, tuple[int, int, int]] = {}
    touching = 0
    for i, group in enumerate(groups):
        padded = flat_group_numel(sum(n for _, n in group), world)
        part = padded // world
        parts.append(part)
        seq.empty_cache()  # before each group's flatten
        if spec.flatten_on_cpu and i == 0:  # the group moves to the host, is flattened there, comes back whole
            for name, _ in group:
                seq.free(("param", name))
            seq.empty_cache()
            seq.alloc(("flat", i), BF16 * padded)
        else:
            seq.alloc(("flat", i), BF16 * padded)
            for name, _ in group:
                seq.free(("param", name))
        seq.alloc(("clone", i), BF16 * part)
        if not spec.offload:
            seq.alloc(("master", i), 4 * part)
        seq.free(("clone", i))
        start = 0
        for name, n in group:
            layout[name] = (i, start, n)
            if start < part:
                in_partition[name] = min(start + n, part) - start
                touching += n
            start += n
    if spec.offload:
        seq.alloc("temp_grad_buffer_for_gpu_offload", BF16 * max(n for group in groups for _, n in group))
    else:
        for i, part in enumerate(parts):
            seq.temp(("zero_fp32_grad", i), 4 * part)
    return layout, parts, in_partition, touching


UPDATES = ("adamw-torch", "adamw-fused", "lion", "sgd", "sgd-momentum", "adafactor")
"""The updates ``optimizer_step`` writes; each its requests on a group's flat fp32 partition of p elements (4p bytes
a tensor), in order (recorded on the H200: data/runs/h200-sequences, optimizers and long rows):

* adamw-torch (torch/optim/adamw.py ``_multi_tensor_adamw``): ``exp_avg`` and ``exp_avg_sq`` at the first step
  (kept), then the foreach ``exp_avg_sq.sqrt()`` temporary each step;
* adamw-fused (FusedAdam), lion (ops/lion/fused_lion.py ``FusedLion``: ``exp_avg``): the states at the first step,
  no temporary (one kernel, in place);
* sgd and sgd-momentum (torch/optim/sgd.py ``_multi_tensor_sgd``): with weight decay, ``grads + wd * params``
  first; then, with momentum, ``torch.clone(grad)`` as the momentum buffer at the first step (kept); the decayed
  copy dropped once the buffer replaces it (recorded with momentum; plain SGD follows the same code without the
  buffer). Weight decay is the first group's of the Trainer's two (``validate.adapters.parameter_groups``: 0.01
  and 0.0); one group has none (the ds_config's SGD section sets none, ``configs.ds_write``);
* adafactor (torch/optim/_adafactor.py ``_single_tensor_adafactor`` on a 1-D tensor): ``variance`` at the first
  step (kept), then each step ``grad * grad`` and ``variance.clone()``, both alive until the update ends.
"""


def optimizer_step(seq: Sequence, step: int, parts: list[int], in_partition: dict[str, int],
                   update: str) -> None:
    """``step`` without offload: norms, flat gradient partitions, the update's states and temporaries
    (``UPDATES``)."""
    for name, n in in_partition.items():
        seq.temp(("gradnorm64", step, name), 8 * n)
    for i, part in enumerate(parts):
        seq.alloc(("flat_grad16", step, i), BF16 * part)
        seq.alloc(("fp32_grad", step, i), 4 * part)
        seq.free(("flat_grad16", step, i))
        if i == len(parts) - 1:  # the last group's averaged_gradients = None drops the last views of it
            seq.free(("grads_in_partition", step))
        state_update(seq, step, i, 4 * part, update, decay=i == 0 and len(parts) == 2)
        seq.free(("fp32_grad", step, i))


def state_update(seq: Sequence, step: int, group: int, size: int, update: str, *, decay: bool) -> None:
    """The update's states at the first step and its temporaries each step, on one flat fp32 partition of ``size``
    bytes (``UPDATES``; ``decay``: the group decays weights)."""
    first = step == 0
    if update in ("adamw-torch", "adamw-fused", "lion"):
        for state in ("exp_avg", "exp_avg_sq") if update != "lion" else ("exp_avg",):
            if first:
                seq.alloc((state, group), size)
        if update == "adamw-torch":
            seq.temp(("adam_temp", step, group), size)
    elif update in ("sgd", "sgd-momentum"):
        if decay:
            seq.alloc(("sgd_decayed", step, group), size)
        if first and update == "sgd-momentum":
            seq.alloc(("momentum_buffer", group), size)
        seq.free(("sgd_decayed", step, group))
    elif update == "adafactor":
        if first:
            seq.alloc(("variance", group), size)
        seq.alloc(("grad_squared", step, group), size)
        seq.alloc(("var_estimate", step, group), size)
        seq.free(("grad_squared", step, group))
        seq.free(("var_estimate", step, group))
    else:
        raise ValueError(f"no request model for the update {update!r}")
