"""sparse_lm.profiling: kernel time read back from a Perfetto trace, by name and category."""

import gzip
import json
import os

import jax
import jax.numpy as jnp
import pytest

from sparse_lm import profiling


def _write_trace(folder, events):
    path = os.path.join(folder, "plugins", "profile", "run1")
    os.makedirs(path)
    with gzip.open(os.path.join(path, "perfetto_trace.json.gz"), "wt") as fh:
        json.dump({"traceEvents": events}, fh)


def _meta(pid, name, tid=None, thread=None):
    if thread is None:
        return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
    return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": thread}}


def _kernel(pid, tid, name, dur, ts=0.0):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}


def _device_kernels(pid):
    """1,300 µs of kernels over 1,290 µs: the last one overlaps (another stream)."""
    return [
        _meta(pid, "", tid=10, thread="Stream #13(Compute)"),
        _meta(pid, "", tid=12, thread="Stream #14(Compute)"),
        _meta(pid, "", tid=11, thread="XLA Ops"),
        _kernel(pid, 10, "sparse_attn_fwd_v2", 300.0, ts=0.0),
        _kernel(pid, 10, "sparse_attn_fwd_v2", 300.0, ts=300.0),
        _kernel(pid, 10, "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", 500.0, ts=600.0),
        _kernel(pid, 10, "loop_multiply_fusion", 100.0, ts=1100.0),
        _kernel(pid, 10, "transpose_fusion_3", 50.0, ts=1200.0),
        _kernel(pid, 10, "rng_bit_generator", 40.0, ts=1250.0),
        _kernel(pid, 12, "mystery_kernel", 10.0, ts=1280.0),
        _kernel(pid, 11, "dot.12", 500.0, ts=600.0),            # XLA op line repeats a kernel
    ]


def gpu_trace(tmp_path, devices: int = 1):
    events = [_meta(1, "/host:CPU"), _kernel(1, 5, "python: step", 9000.0)]  # host: not counted
    for i in range(devices):
        events += [_meta(2 + i, f"/device:GPU:{i}")] + _device_kernels(2 + i)
    _write_trace(str(tmp_path), events)
    return str(tmp_path)


def test_sums_stream_kernels_per_step_and_category(tmp_path):
    b = profiling.kernel_breakdown(gpu_trace(tmp_path), steps=2)
    assert b["device_ms"] == pytest.approx(1.3 / 2)
    assert b["busy_ms"] == pytest.approx(1.29 / 2)  # the overlapping kernel counts once
    assert b["devices"] == 1
    assert b["by_category"] == pytest.approx({
        "attention": 0.3, "matmul": 0.25, "fusion": 0.05, "copy": 0.025, "rng": 0.02, "other": 0.005})
    assert b["top"][0] == ("sparse_attn_fwd_v2", pytest.approx(0.3), 1.0)
    assert b["top"][1] == ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", pytest.approx(0.25), 0.5)
    table = profiling.format_breakdown("step", b, wall_ms=1.0)
    assert "64% busy" in table and "attention" in table


def test_several_devices_in_one_process_report_the_average_device(tmp_path):
    one = profiling.kernel_breakdown(gpu_trace(tmp_path / "one"), steps=2)
    eight = profiling.kernel_breakdown(gpu_trace(tmp_path / "eight", devices=8), steps=2)
    assert eight["devices"] == 8
    for key in ("device_ms", "busy_ms"):
        assert eight[key] == pytest.approx(one[key])
    assert eight["by_category"] == pytest.approx(one["by_category"])
    assert eight["top"][0][1:] == pytest.approx(one["top"][0][1:])
    assert "average of 8 devices" in profiling.format_breakdown("step", eight, wall_ms=1.0)


def test_categories_of_known_kernel_names():
    assert profiling.category("mosaic_gpu_kernel_3") == "attention"
    assert profiling.category("cutlass3x_sm90_tensorop_gemm_bf16") == "matmul"
    assert profiling.category("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "collective"
    assert profiling.category("input_reduce_fusion_7") == "reduction"
    assert profiling.category("Memcpy DtoD") == "copy"


def test_a_trace_without_device_kernels_is_an_error(tmp_path):
    _write_trace(str(tmp_path), [_meta(1, "/host:CPU"), _kernel(1, 5, "python", 10.0)])
    with pytest.raises(ValueError, match="no device kernel events"):
        profiling.kernel_breakdown(str(tmp_path))


def test_a_folder_without_a_trace_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace=True"):
        profiling.kernel_breakdown(str(tmp_path))


def test_profile_writes_a_readable_trace_on_cpu(tmp_path):
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    folder = profiling.profile(lambda: f(x), str(tmp_path / "prof"), steps=2)
    # On CPU the trace holds only host events: read back, it is refused, not summed to zero.
    with pytest.raises(ValueError, match="no device kernel events"):
        profiling.kernel_breakdown(folder)


def test_step_window_moves_past_steps_it_missed_and_reports_once(tmp_path):
    f = jax.jit(lambda x: x * 2)
    x = jnp.ones((8,))
    trace = profiling.StepWindowTrace(str(tmp_path / "w"), first=2, steps=2)
    reports = []
    for step in range(5, 9):  # a resumed run: the window (2, 3) has passed
        trace.before(step, x)
        x = f(x)
        reports.append(trace.after(step, x))
    assert [r is not None for r in reports] == [False, True, False, False]
    assert (reports[1]["first_step"], reports[1]["steps"]) == (5, 2)
    assert not trace.active


def test_a_window_cut_short_is_closed_so_the_profiler_can_start_again(tmp_path):
    trace = profiling.StepWindowTrace(str(tmp_path / "w"), first=1, steps=5)
    trace.before(1)
    assert trace.after(1, None) is None  # the run ends here, inside the window
    trace.close()
    assert "ended inside the window" in trace.report["error"]
    again = profiling.StepWindowTrace(str(tmp_path / "w2"), first=1, steps=1)
    again.before(1)
    assert again.after(1, None)["steps"] == 1  # start_trace would fail had the first not stopped


def test_step_window_off_when_first_is_zero(tmp_path):
    trace = profiling.StepWindowTrace(str(tmp_path / "w"), first=0, steps=3)
    trace.before(1)
    assert trace.after(1, None) is None and not (tmp_path / "w").exists()


def test_compile_watch_reports_a_second_compilation_once():
    f = jax.jit(lambda x: x * 2)
    watch = profiling.CompileWatch(f)
    f(jnp.ones((4,)))
    f(jnp.ones((4,)))
    assert watch.check() is None and watch.count() == 1
    f(jnp.ones((5,)))  # a new shape: compiled again
    message = watch.check()
    assert "compiled 2 times" in message and "same shape" in message
    f(jnp.ones((6,)))
    assert watch.check() is None  # said once


def test_compile_watch_is_silent_without_a_cache_count():
    watch = profiling.CompileWatch(lambda x: x)
    assert watch.count() is None and watch.check() is None


def _norm(x):  # the lines the next test expects the kernels to be traced back to
    centred = x - x.mean(-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + 1e-5)


def test_hlo_sources_trace_kernels_back_to_model_lines():
    code = _norm.__code__
    lines = {f"test_profiling.py:{code.co_firstlineno + i} _norm" for i in (1, 2)}
    f = jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(_norm(x)))))
    sources = profiling.hlo_sources(f.lower(jnp.ones((32, 64))).compile().as_text())
    assert sources and all("." not in name for name in sources)  # trace names: '.' -> '_'
    named = {where for found in sources.values() for where, _ in found}
    assert lines <= named, named
    fused = [found for name, found in sources.items() if "fusion" in name]
    assert fused and all(n >= 1 for found in fused for _, n in found)


def test_hlo_sources_read_inline_source_metadata():
    """The older HLO text: source file and line on the instruction, no frame tables; a
    fusion gets its fused computation's lines, most instructions first."""
    text = "\n".join([
        "HloModule m",
        "%fused_computation.3 (p0: f32[8]) -> f32[8] {",
        "  %p0 = f32[8]{0} parameter(0)",
        '  %m.1 = f32[8]{0} multiply(%p0, %p0), metadata={op_name="mul" source_file="/x/model.py" source_line=91}',
        '  %m.2 = f32[8]{0} multiply(%m.1, %p0), metadata={op_name="mul" source_file="/x/model.py" source_line=91}',
        '  ROOT %a.1 = f32[8]{0} add(%m.2, %p0), metadata={op_name="add" source_file="/x/model.py" source_line=140}',
        "}",
        "",
        "ENTRY %main.9 (x: f32[8]) -> f32[8] {",
        "  %x = f32[8]{0} parameter(0)",
        '  ROOT %loop_add_fusion.3 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_computation.3, metadata={op_name="add"}',
        "}",
    ])
    sources = profiling.hlo_sources(text)
    assert sources["loop_add_fusion_3"] == [("model.py:91", 2), ("model.py:140", 1)]
    b = {"device_ms": 1.0, "by_category": {"fusion": 1.0},
         "top": [("loop_add_fusion_3", 1.0, 1.0), ("nvjet_sm90_gemm", 0.5, 1.0)]}
    b = profiling.with_sources(b, text)  # a library kernel has no HLO line: left out
    assert b["sources"] == {"loop_add_fusion_3": [("model.py:91", 2), ("model.py:140", 1)]}
    table = profiling.format_breakdown("s", b, sources=b["sources"])
    assert "loop_add_fusion_3  <- model.py:91 (2), model.py:140 (1)" in table
    assert table.rstrip().endswith("nvjet_sm90_gemm")


def test_hlo_sources_skip_library_frames_for_the_callers_line():
    """Stack-frame tables (newer XLA): a parent_frame_id is printed as the parent's row
    + 1 (1: no parent). An instruction whose innermost frame is in an installed package
    is attributed to the nearest caller outside packages; with none, to the library."""
    text = "\n".join([
        "HloModule m",
        "",
        "FileNames",
        '1 "/repo/sparse_lm/model.py"',
        '2 "/venv/lib/python3.12/site-packages/flax/nnx/module.py"',
        "",
        "FunctionNames",
        '1 "Block.__call__"',
        '2 "__call__"',
        "",
        "FileLocations",
        "1 {file_name_id=1 function_name_id=1 line=240 end_line=240 column=4 end_column=9}",
        "2 {file_name_id=2 function_name_id=2 line=77 end_line=77 column=2 end_column=9}",
        "",
        "StackFrames",
        "1 {file_location_id=1 parent_frame_id=1}",
        "2 {file_location_id=2 parent_frame_id=2}",
        "3 {file_location_id=2 parent_frame_id=1}",
        "",
        "ENTRY %main.2 (x: f32[8]) -> f32[8] {",
        "  %x = f32[8]{0} parameter(0)",
        '  %sine.1 = f32[8]{0} sine(%x), metadata={op_name="sin" stack_frame_id=2}',
        '  ROOT %cosine.1 = f32[8]{0} cosine(%sine.1), metadata={op_name="cos" stack_frame_id=3}',
        "}",
    ])
    sources = profiling.hlo_sources(text)
    assert sources["sine_1"] == [("model.py:240 Block.__call__", 1)]  # frame 2's parent: row 1
    assert sources["cosine_1"] == [("module.py:77 __call__", 1)]  # only a library frame
