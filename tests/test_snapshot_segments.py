"""benchmarks/snapshot_peak.py's segment report read off a memory snapshot in torch's schema
(``torch.cuda.memory._snapshot()``: ``device_traces`` events and ``segments`` with their blocks)."""

MiB = 2**20


def _frame(path: str, line: int, name: str) -> dict:
    return {"filename": f"/tmp/site/{path}", "line": line, "name": name}


def test_segments_name_each_growth_by_the_request_that_made_it(benchmark_script):
    bucket, norm_copy = 929.357 * MiB, 1780.5 * MiB
    events = [
        {"action": "alloc", "addr": 1, "size": 64 * MiB, "frames": []},               # fits the cache: no segment
        {"action": "segment_alloc", "addr": 2, "size": 930 * MiB},
        {"action": "alloc", "addr": 2, "size": bucket,
         "frames": [_frame("torch/cuda/x.py", 1, "inner"),                          # torch's own frame is dropped
                    _frame("deepspeed/runtime/zero/stage_1_and_2.py", 2367, "allreduce_bucket")]},
        {"action": "segment_alloc", "addr": 3, "size": 1782 * MiB},
        {"action": "alloc", "addr": 3, "size": norm_copy,
         "frames": [_frame("deepspeed/runtime/zero/stage_1_and_2.py", 1886, "set_norm_for_param_grad_in_gpu")]},
        {"action": "free_completed", "addr": 3, "size": norm_copy, "frames": []},
        {"action": "segment_free", "addr": 9, "size": 20 * MiB},
    ]
    segments = [
        {"total_size": 1782 * MiB, "segment_type": "large", "blocks": [{"size": 1782 * MiB, "state": "inactive"}]},
        {"total_size": 930 * MiB, "segment_type": "large",
         "blocks": [{"size": 930 * MiB - 445 * MiB, "state": "active_allocated"},
                    {"size": 445 * MiB, "state": "inactive"}]},
        {"total_size": 2 * MiB, "segment_type": "small", "blocks": [{"size": 2 * MiB, "state": "inactive"}]},
    ]
    out = benchmark_script("snapshot_peak")._segments({"device_traces": [events], "segments": segments}, events)

    assert [g["mib"] for g in out["segments_grown"]] == [930.0, 1782.0]
    assert [g["request_mib"] for g in out["segments_grown"]] == [929.357, 1780.5]
    bucket_frame = "/tmp/site/deepspeed/runtime/zero/stage_1_and_2.py:2367 allreduce_bucket"
    assert out["segments_grown"][0]["stack"] == [bucket_frame]
    assert out["segments_grown_gib"] == (930 + 1782) / 1024
    assert out["segments_returned"] == [{"at": 6, "mib": 20.0}]
    assert out["segments_at_end"] == {"large >20 MiB": {"count": 2, "gib": (1782 + 930) / 1024},
                                      "small <=20 MiB": {"count": 1, "gib": 2 / 1024}}
    assert out["free_in_cache_at_end_gib"] == (1782 + 445 + 2) / 1024
    assert out["largest_free_block_at_end_mib"] == 1782.0
    assert out["free_blocks_over_100_mib"] == [1782.0, 445.0]
