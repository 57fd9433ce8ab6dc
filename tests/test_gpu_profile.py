"""bench/gpu_profile.py's reading of a Perfetto trace, on a trace written by hand."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

from gpu_profile import format_report, kind_of, scope_of, summarize  # noqa: E402


def _trace(kernels, pid=7, host_events=()):
    meta = [
        {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": pid, "tid": 1, "name": "thread_name", "args": {"name": "Stream #13"}},
        {"ph": "M", "pid": pid, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    events = [
        {"ph": "X", "pid": pid, "tid": 1, "name": k[0], "ts": k[1], "dur": k[2]}
        | ({"args": k[3]} if len(k) > 3 else {})
        for k in kernels
    ]
    # the same ops again on the "XLA Ops" line and host events: not kernels, not counted
    events += [{**e, "tid": 2} for e in events]
    events += [{"ph": "X", "pid": 1, "tid": 1, "name": n, "ts": 0, "dur": 9e9} for n in host_events]
    return {"traceEvents": meta + events}


def test_kinds_time_and_overlap():
    trace = _trace(
        [
            ("l2a_flash_forward", 0, 400),  # attention, 0-400 us
            ("ncclDevKernel_AllGather_RING_LL", 300, 300),  # 300-600: 400-600 alone
            ("nvjet_sm90_tst_128x128", 700, 100),  # matmul
            ("loop_add_fusion", 750, 100),  # other, overlaps the matmul
            ("ncclDevKernel_SendRecv", 900, 50),  # alone
        ],
        host_events=["ncclDevKernel_fake_host"],
    )
    report = summarize(trace, wall_s=1e-3)
    assert report["gpu"] == "/device:GPU:0"
    assert report["kernel_s"] == pytest.approx(
        {"attention": 400e-6, "collective": 350e-6, "matmul": 100e-6, "other": 100e-6}
    )
    # busy: 0-600, 700-850, 900-950
    assert report["busy_s"] == pytest.approx(800e-6)
    assert report["collective_exposed_s"] == pytest.approx(250e-6)
    assert report["collective_share"] == pytest.approx(0.35)
    assert report["top"][0] == ("l2a_flash_forward", pytest.approx(400e-6))
    assert "collective" in format_report(report)


def test_no_gpu_is_reported_not_raised():
    report = summarize({"traceEvents": _trace([])["traceEvents"][3:]}, wall_s=1.0)
    assert "no GPU stream events" in report["error"]
    assert format_report(report).startswith("profile: no GPU")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", "collective"),
        ("l2a_flash_dkdv__2", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90", "attention"),
        ("sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n", "matmul"),
        ("input_reduce_fusion_8", "other"),
    ],
)
def test_kind_of(name, kind):
    assert kind_of(name) == kind


def test_time_by_named_scope_and_phase():
    def op(stack):
        return {"hlo_op": "fusion.1", "name": stack}

    trace = _trace(
        [
            ("l2a_flash_forward", 0, 300, op("jit(train_step)/while/body/global_attention/pallas")),
            ("l2a_flash_dkdv", 300, 500, op("jit(train_step)/transpose(jvp(global_attention))/x")),
            ("nvjet_a", 800, 100, op("jit(train_step)/jvp(mlp)/dot_general")),
            ("nvjet_b", 900, 40, op("jit(train_step)/transpose(jvp(mlp))/dot_general")),
            ("loop_fusion", 940, 10, op("jit(train_step)/optimizer/add")),
            ("copy_fusion", 950, 20, op("jit(train_step)/concatenate")),
            ("memset", 970, 5, {"hlo_op": "command_buffer_1"}),  # no name stack
        ]
    )
    report = summarize(trace, wall_s=1e-3)
    scopes = report["scope_s"]
    assert scopes["global_attention"] == pytest.approx({"forward": 300e-6, "backward": 500e-6})
    assert scopes["mlp"] == pytest.approx({"forward": 100e-6, "backward": 40e-6})
    assert scopes["optimizer"] == pytest.approx({"forward": 10e-6, "backward": 0.0})
    assert scopes["unscoped"]["forward"] == pytest.approx(20e-6)
    assert scopes["unknown"]["forward"] == pytest.approx(5e-6)
    assert report["scope_examples"]["mlp"]["kernel"] == "nvjet_a"
    assert report["scope_top"]["mlp"][0][:2] == ("nvjet_a", "jit(train_step)/jvp(mlp)/dot_general")
    assert scope_of({}) == ("unknown", "forward")
    text = format_report(report)
    assert "global_attention" in text and "by operation" in text


@pytest.mark.parametrize(
    ("stack", "expected"),
    [
        ("jit(f)/jvp(window_attention)/pallas_call", ("window_attention", "forward")),
        ("jit(f)/transpose(jvp(attention))/dot", ("attention", "backward")),
        ("jit(f)/global_qkv_proj/dot_general", ("global_qkv_proj", "forward")),
        ("jit(f)/my_attention_thing/dot", ("unscoped", "forward")),  # whole names only
        ("jit(f)", ("unscoped", "forward")),
    ],
)
def test_scope_of(stack, expected):
    assert scope_of({"name": stack}) == expected
