"""The request sequence of a ZeRO-1/2 run built on the CPU, replayed through the allocator model, against a recording.

usage (CPU; torch, transformers and peft installed):
  python benchmarks/sequence_replay.py CONFIG --stage 2 --world 2 --micro-batch 2 --seq-len 2048 --ckpt \
      [--offload] [--lora-rank 16] [--param-groups 2] [--loop trainer] [--steps 3] \
      [--events data/runs/h200-sequences/long8-events.json.gz]

``benchmarks/allocator_replay.py`` showed that the caching allocator, fed a run's recorded requests, gives its peak
reserve to the byte, and its ``--events-out`` keeps a run's whole sequence (``data/runs/h200-sequences``). This
script builds that sequence from the model and DeepSpeed 0.19.8's source (rank 0 of ``--world`` ranks on the fake
process group, where collectives allocate nothing; the validator's custom or trainer loop; one parameter group or
the Trainer's two; ``reduce_bucket_size`` 5e8, ``contiguous_gradients`` on, ``overlap_comm`` off) and prints the
replayed reserve at the end of each phase; with ``--events``, beside the recording's own replay, and the sizes of
64 MiB and more that the two make a different number of times; ``--cut`` traces four decoder layers and expands
them (``trace.sequence.expand``). It replaces the eighth session's LoRA-only
``sequence_replay_lora.py``.

The sequence, request by request (b the 16-bit width, P_g a group's trainable parameters, N the ranks):

* the model on the GPU: every parameter and buffer in ``named_parameters`` order (engine.py
  ``_configure_distributed_model``, ``module.to``);
* ``DeepSpeedZeroOptimizer.__init__`` (stage_1_and_2.py), group by group: ``empty_cache()`` (segments given back,
  the peak restarted, as the recording shows), the flat copy of the group (``flatten_dense_tensors_aligned``,
  b P_g) and its original tensors freed (``_update_model_bit16_weights``), the partition's ``.clone().to(fp32)``
  (b P_g/N, then 4 P_g/N, or none with offload, where it goes to the host; the clone freed); where the card's free
  memory is short of the flat buffer (``--flatten-on-cpu``), the group's tensors leave for the host first, another
  ``empty_cache()`` follows and the flat buffer comes back as one block; then with offload
  ``temp_grad_buffer_for_gpu_offload`` (b n_max, kept), without it ``initialize_optimizer_states``' zero fp32
  gradient per group (4 P_g/N, made and dropped);
* each micro-step: cuBLAS's workspace at the first GEMM of the first forward (the rotary embedding's, right after the
  embeddings' output) and of the first backward (``CUBLAS_WORKSPACE``, kept; the trace's ``first_gemm_bwd``); the
  forward and backward of ``trace.recorder.run_trace`` on the meta device at full depth, the input ids and the loss
  dropped at the step's end; the custom loop keeps the logits the model returns (gemma-2's softcapped ones, not the
  head's) until the next forward returns, the trainer loop only the loss. In backward, at the first parameter
  gradient, the ipg bucket (``setup_buckets``, b 5e8). At stage 2 each parameter's final gradient is copied into the
  bucket and its own storage dropped at its hook (``reduce_independent_p_g_buckets_and_remove_grads``:
  ``grad_reduc.data = new_grad_tensor``). A gradient that would overflow the bucket first flushes it
  (``reduce_ipg_grads``): the flatten of its tensors (``allreduce_bucket``, b E), only where they make two slices or
  more (``average_tensor`` merges consecutive parameters bound for the same rank, whatever their group; one tensor is
  flattened as a view); then for each of its parameters in the rank's partition, without offload the copy into
  ``grads_in_partition`` (made at the first flush: b times the elements of every parameter that starts in the
  partition, ``copy_grads_in_partition``), with offload the fp64 copy for its norm
  (``set_norm_for_param_grad_in_gpu``, 8 n) and the fp32 copy for the host
  (``async_inplace_copy_grad_to_fp32_buffer_from_gpu``, 4 n), each made and dropped. The last flush comes at the end
  of backward, then the bucket is released (``_release_ipg_buffers``). Stage 1 keeps every gradient until backward
  ends, then sends them through the bucket in the groups' order (``reduce_gradients``);
* ``step`` without offload: the fp64 norm of each gradient in the partition (``get_grad_norm_direct``, 8 n each,
  made and dropped); then per group the flat 16-bit gradient partition (b P_g/N) and its fp32 copy (4 P_g/N, the
  first dropped); ``grads_in_partition`` dropped with the last group's ``averaged_gradients``, before that group's
  optimizer step; Adam's ``exp_avg`` and ``exp_avg_sq`` at the first step (4 P_g/N each, kept) and one temporary of
  4 P_g/N; then the fp32 gradient dropped. With offload the step runs on the host.

Left out: DeepSpeed's requests under 1 MiB (scalars, NCCL), kernel workspaces other than cuBLAS's, gradient
accumulation, stage 0 and stage 3. How close it comes to the recordings and to every measured row it covers:
docs/DEVICE_RUNS.md, ninth session (``sequence_rows.py``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import Counter
from pathlib import Path

GiB, MiB = 2**30, 2**20
CUBLAS_WORKSPACE = 32 * MiB
"""cuBLAS's workspace on a Hopper card, allocated through the caching allocator at a handle's first GEMM and kept
(the recordings show one at the first forward's first matmul and one at the first backward's, autograd's thread
having its own handle: 32 MiB each; ``Overheads.cublas_workspace_bytes`` counts 66 MiB)."""


class Sequence:
    """Requests in order: ``("a", key, bytes)``, ``("f", key)``, ``("empty",)``, ``("mark", name)``."""

    def __init__(self) -> None:
        self.ops: list[tuple] = []
        self.live: set = set()

    def alloc(self, key, size: int) -> None:
        self.ops.append(("a", key, int(size)))
        self.live.add(key)

    def free(self, key) -> None:
        if key in self.live:
            self.live.discard(key)
            self.ops.append(("f", key))

    def temp(self, key, size: int) -> None:
        self.alloc(key, size)
        self.free(key)

    def mark(self, name: str) -> None:
        self.ops.append(("mark", name))


class Bucket:
    """The ipg bucket's flushes in one backward (``reduce_independent_p_g_buckets_and_remove_grads``,
    ``reduce_ipg_grads``): the requests each flush makes. ``layout``: parameter -> (group, first element in the
    group's flat buffer, elements); ``parts``: each group's partition size; ``in_partition``: the elements of each
    parameter inside the rank's partition (``build`` derives it with the layout)."""

    def __init__(self, seq: Sequence, step: int, args, layout: dict[str, tuple[int, int, int]],
                 parts: list[int], in_partition: dict[str, int], touching: int) -> None:
        self.seq, self.step, self.b, self.capacity = seq, step, 2, args.bucket
        self.layout, self.parts, self.in_partition, self.touching = layout, parts, in_partition, touching
        self.offload = args.offload
        self.names: list[str] = []
        self.elements = 0
        self.made = False

    def make_grads_in_partition(self) -> None:
        if not self.made:
            self.seq.alloc(("grads_in_partition", self.step), self.b * self.touching)
            self.made = True

    def add(self, name: str, numel: int) -> None:
        if self.elements + numel > self.capacity:
            self.flush()
        self.names.append(name)
        self.elements += numel

    def _slices(self) -> int:
        """The slices ``average_tensor`` reduces: each parameter's piece per partition it touches, the pieces of
        consecutive parameters bound for the same rank being one slice, whatever their group (its
        ``rank_and_offsets`` merge compares the partition id, the process group and the copy ranks). So a flush
        has two slices or more only where its gradients cross a partition's edge, of either group: with the
        Trainer's two, the norms' group has its own edge, met by the flush that holds the middle layer's norms."""
        keys: list[int] = []
        for name in self.names:
            group, start, numel = self.layout.get(name, (0, 0, 0))
            part = max(1, self.parts[group]) if self.parts else 1
            for dst in range(start // part, (start + max(numel, 1) - 1) // part + 1):
                if not (keys and keys[-1] == dst):
                    keys.append(dst)
        return len(keys)

    def flush(self) -> None:
        if self._slices() > 1:  # allreduce_bucket's flatten; one tensor is flattened as a view
            self.seq.temp(("flatten", self.step, len(self.seq.ops)), self.b * self.elements)
        for name in self.names:
            in_partition = self.in_partition.get(name, 0)
            if in_partition <= 0:
                continue
            if self.offload:
                self.seq.temp(("norm64", self.step, name), 8 * in_partition)
                self.seq.temp(("to_fp32", self.step, name), 4 * in_partition)
            else:
                self.make_grads_in_partition()
        self.names.clear()
        self.elements = 0


def build(model, trace, args) -> Sequence:
    """The sequence of the module docstring for a model built by ``trace.model.build_trained`` and its trace."""
    b, world = 2, args.world
    seq = Sequence()
    for name, param in model.named_parameters():
        seq.alloc(("param", name), param.numel() * param.element_size())
    for name, buffer in model.named_buffers():
        seq.alloc(("buffer", name), buffer.numel() * buffer.element_size())
    seq.mark("build")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if args.param_groups == 2:  # validate/adapters.py parameter_groups: decay, then biases and norms
        decay = {n for n, _ in named if "bias" not in n and "norm" not in n.lower()}
        groups = [[(n, p) for n, p in named if n in decay], [(n, p) for n, p in named if n not in decay]]
    else:
        groups = [named]
    groups = [[(name, p.numel()) for name, p in group] for group in groups if group]
    trainable = [entry for group in groups for entry in group]
    align = 2 * world  # nccl_start_alignment_factor x N
    parts, in_partition, touching = [], {}, 0
    layout: dict[str, tuple[int, int, int]] = {}
    for i, group in enumerate(groups):
        padded = -(-sum(n for _, n in group) // align) * align
        part = padded // world
        parts.append(part)
        seq.ops.append(("empty",))  # DeepSpeedZeroOptimizer.__init__: empty_cache() before each group's flatten
        if getattr(args, "flatten_on_cpu", False) and i == 0:  # too little free memory: the group moves to the
            for name, _ in group:  # host, is flattened there and comes back as one block
                seq.free(("param", name))
            seq.ops.append(("empty",))
            seq.alloc(("flat", i), b * padded)
        else:
            seq.alloc(("flat", i), b * padded)
            for name, _ in group:
                seq.free(("param", name))
        seq.alloc(("clone", i), b * part)
        if not args.offload:
            seq.alloc(("master", i), 4 * part)
        seq.free(("clone", i))
        start = 0
        for name, n in group:
            layout[name] = (i, start, n)
            if start < part:
                in_partition[name] = min(start + n, part) - start
                touching += n
            start += n
    if args.offload:
        seq.alloc("temp_grad_buffer_for_gpu_offload", b * max(n for _, n in trainable))
    else:
        for i, part in enumerate(parts):
            seq.temp(("zero_fp32_grad", i), 4 * part)
    seq.mark("init")

    size_to_names: dict[int, list[str]] = {}
    for name, n in reversed(trainable):  # gradients come roughly in reverse order; names only pick n_slice
        size_to_names.setdefault(b * n, []).append(name)
    end = trace.marks["bwd_end"]
    freed_by_trace = {~e for e in trace.events[:end] if e < 0}
    kept = None
    # the logits the model returns, which the custom loop keeps: the trace drops the output right after forward, so
    # they are the logits-sized storage freed there (gemma-2 softcaps the head's output into a new tensor)
    dropped = [~e for e in trace.events[trace.marks["fwd_end"]:trace.marks["bwd_start"]] if e < 0]
    returned_logits = next((serial for serial in dropped if trace.sizes[serial] == trace.sizes[trace.logits]),
                           trace.logits)
    # transformers 5.17's rotary embedding runs its first GEMM (a matmul, where 5.2x multiplies) right after the
    # embeddings' output, before any other request of the large pool: the recordings take the workspace there
    start = trace.marks["fwd_start"]
    first_large = next((at for at in range(start, len(trace.events)) if trace.events[at] >= 0
                        and trace.sizes[trace.events[at]] > MiB), start)
    workspace_fwd = min(trace.marks.get("first_gemm_fwd", first_large + 1), first_large + 1)
    for step in range(args.steps):
        pending = {size: list(names) for size, names in size_to_names.items()}
        bucket = Bucket(seq, step, args, layout, parts, in_partition, touching)
        held: list[tuple[str, int, tuple]] = []
        held_keys: set[tuple] = set()
        for at, event in enumerate(trace.events):
            if step == 0 and at in (workspace_fwd, trace.marks.get("first_gemm_bwd")):
                seq.alloc(("cublas_workspace", at), CUBLAS_WORKSPACE)  # one per handle: forward's, autograd's thread
            if at == trace.marks.get("first_grad"):
                seq.alloc(("bucket", step), b * args.bucket)
            if at == trace.marks["fwd_end"]:
                if kept is not None:
                    seq.free(kept)
                seq.mark(f"step{step}.forward0")
            serial = event if event >= 0 else ~event
            key = (step, serial)
            if event >= 0:
                seq.alloc(key, trace.sizes[serial])
                if serial in trace.excluded and serial not in freed_by_trace:
                    names = pending.get(trace.sizes[serial])
                    name = names.pop(0) if names else f"?{serial}"
                    if args.stage == 1:  # reduced after backward (the epilogue), kept until then
                        held.append((name, trace.sizes[serial] // b, key))
                        held_keys.add(key)
                    else:
                        bucket.add(name, trace.sizes[serial] // b)
                        seq.free(key)  # copied into the bucket, its own storage dropped
            elif serial == returned_logits and args.loop == "custom":
                kept = key
            elif key not in held_keys:  # the trace drops .grad after backward; DeepSpeed frees a held gradient
                seq.free(key)  # as the bucket takes it
        by_size: dict[int, list[tuple]] = {}
        for _, n, key in held:
            by_size.setdefault(n, []).append(key)
        for name, n in trainable:  # reduce_gradients: the groups' parameters in order
            keys = by_size.get(n)
            if keys:
                bucket.add(name, n)
                seq.free(keys.pop(0))
        bucket.flush()
        seq.free(("bucket", step))
        seq.mark(f"step{step}.backward0")
        if not args.offload:
            for name, n in in_partition.items():
                seq.temp(("gradnorm64", step, name), 8 * n)
            for i, part in enumerate(parts):
                seq.alloc(("flat_grad16", step, i), b * part)
                seq.alloc(("fp32_grad", step, i), 4 * part)
                seq.free(("flat_grad16", step, i))
                if i == len(parts) - 1:  # the last group's averaged_gradients = None drops the last views of it
                    seq.free(("grads_in_partition", step))
                if step == 0:
                    seq.alloc(("exp_avg", i), 4 * part)
                    seq.alloc(("exp_avg_sq", i), 4 * part)
                seq.temp(("adam_temp", step, i), 4 * part)
                seq.free(("fp32_grad", step, i))
        for key in [k for k in seq.live if isinstance(k[0], int) and k[0] == step and k != kept]:
            seq.free(key)  # the input ids and the loss, dropped with the step
        seq.mark(f"step{step}.step")
    return seq


def replay_sequence(seq: Sequence) -> dict[str, float]:
    """Peak reserve (GiB) at each mark, through ``allocator_replay.CachingAllocatorModel``."""
    from allocator_replay import CachingAllocatorModel

    model, blocks, out = CachingAllocatorModel(), {}, {}
    for op in seq.ops:
        if op[0] == "a":
            blocks[op[1]] = model.malloc(op[2])
        elif op[0] == "f":
            model.free(blocks.pop(op[1]))
        elif op[0] == "empty":
            model.empty_cache()
            model.reset_peak()
        else:
            out[op[1]] = model.peak_reserved / GiB
    return out


def recorded(path: str) -> tuple[dict[str, float], list[int]]:
    """The recording's own replay per phase, and its requests of 64 MiB and more (sizes, in order)."""
    from allocator_replay import ACTION_CODES, replay

    data = json.loads(gzip.decompress(Path(path).read_bytes()))
    actions = {code: action for action, code in ACTION_CODES.items()}
    events = [{"action": actions[code], "size": size, "stream": stream, "addr": block}
              for code, size, stream, block in data["events"]]
    phases = replay(events, [tuple(m) for m in data["marks"]])
    large = [size for code, size, _, _ in data["events"] if code == "a" and size >= 64 * MiB]
    return {name: p["replayed_peak_reserved_gib"] for name, p in phases.items() if not name.startswith("_")}, large


def model_and_trace(config: dict, attn: str, adapters, *, ckpt: bool, micro_batch: int, seq_len: int,
                    cut: bool) -> tuple:
    """(the model at full depth on meta, its trace at the row's shape, whether the trace was expanded): with ``cut``,
    four decoder layers traced and expanded to full depth (``trace.sequence.expand``) where the layers are all of
    one kind, else the full depth traced."""
    import torch
    from zeroest.estimator.trace.kinds import layout
    from zeroest.estimator.trace.model import build_trained
    from zeroest.estimator.trace.recorder import run_trace
    from zeroest.estimator.trace.sequence import CUT_LAYERS, expand

    model = build_trained(config, "bf16", attn, adapters, grad_ckpt=ckpt, num_layers=None)
    ids = torch.zeros((micro_batch, seq_len), dtype=torch.long, device="meta")
    kinds = layout(model)["kinds"] if cut else []
    if cut and len(set(kinds)) == 1 and len(kinds) > CUT_LAYERS:
        short = build_trained(config, "bf16", attn, adapters, grad_ckpt=ckpt, num_layers=CUT_LAYERS)
        trace = run_trace(short, ids, grad_ckpt=ckpt, target="cuda")
        return model, expand(trace, CUT_LAYERS, len(kinds), kinds=kinds), True
    return model, run_trace(model, ids, grad_ckpt=ckpt, target="cuda"), False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a model's config.json")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--ckpt", action="store_true")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--loop", choices=("custom", "trainer"), default="custom",
                        help="custom: outputs kept until the next forward returns; trainer: only the loss")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--param-groups", type=int, choices=(1, 2), default=1)
    parser.add_argument("--attn", default="sdpa", help="the attention implementation the row ran (eager, sdpa)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bucket", type=int, default=500_000_000, help="reduce_bucket_size, elements")
    parser.add_argument("--flatten-on-cpu", action="store_true",
                        help="the first group flattens on the host (the card's free memory is short of it: "
                             "core/capacity.py flatten_decision)")
    parser.add_argument("--cut", action="store_true", help="trace four decoder layers and expand them to full depth")
    parser.add_argument("--events", help="a recording of the same row (allocator_replay.py --events-out)")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from zeroest.estimator.core.adapters import Adapters

    config = json.loads(Path(args.config).read_text())
    adapters = (Adapters(lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_targets="all-linear")
                if args.lora_rank else Adapters())
    started = time.perf_counter()
    model, trace, expanded = model_and_trace(config, args.attn, adapters, ckpt=args.ckpt,
                                             micro_batch=args.micro_batch, seq_len=args.seq_len, cut=args.cut)
    depth = "four layers, expanded" if expanded else "full depth"
    print(f"traced {len(trace.sizes)} storages ({depth}) in {time.perf_counter() - started:.1f} s")
    seq = build(model, trace, args)
    built = replay_sequence(seq)
    ours = sorted(op[2] for op in seq.ops if op[0] == "a" and op[2] >= 64 * MiB)
    theirs: dict[str, float] = {}
    if args.events:
        theirs, large = recorded(args.events)
        print(f"requests of 64 MiB and more: built {len(ours)}, recorded {len(large)}")
        mine, rec = Counter(size // MiB for size in ours), Counter(size // MiB for size in large)
        for mib in sorted(set(mine) | set(rec)):
            if mine[mib] != rec[mib]:
                print(f"  {mib:6d} MiB: built {mine[mib]}, recorded {rec[mib]}")
    for name, gib in built.items():
        other = theirs.get(name)
        print(f"{name:16s} built {gib:7.3f} GiB" + (f"   recording {other:7.3f} GiB  ({gib / other - 1:+.1%})"
                                                    if other else ""))


if __name__ == "__main__":
    main()
