"""bench/: the targets and verdicts its report prints, from rows made up here (no timing runs), and
that each provider runs the ops on its own backend."""
import re

import numpy as np
import pytest
import torch

import bench.__main__ as cli
from bench import providers, report
from kernel_testing import launches

PAPER, AM = (64, 8, 768, 32, 32), (64, 14, 768, 32, 32)


class Args:
    quick, cuda_graphs, max_gb, note = False, True, 35.0, ""


def meta(cuda):
    class Device:
        type = "cuda" if cuda else "cpu"
    return report.metadata("H200" if cuda else "CPU AMD EPYC", Args, Device, 0.5, "channels_last") | \
        {"copy": "4000 GB/s"}


def row(op, shape, provider, pass_, ms, pct=""):
    return dict(op=op, shape=shape, dtype="bfloat16", provider=provider, pass_=pass_, ms=str(ms), reps="",
                gbps="1.0", pct_copy=str(pct), compile_s="", note="")


def gpu_rows():
    return [row("masked_cam", PAPER, "triton", "fwd", 0.1, pct=93.5),
            row("masked_cam", PAPER, "compile_default", "fwd+bwd", 10.0),
            row("masked_cam", PAPER, "compile_max-autotune", "fwd+bwd", 8.0),
            row("masked_cam", PAPER, "triton", "fwd+bwd", 5.0),
            row("am_step", AM, "compile_default", "fwd+bwd", 8.0),
            row("am_step", AM, "triton", "fwd+bwd", 5.0)]


def test_targets_are_judged_beside_each_triton_row_and_in_the_summary():
    rows = gpu_rows()
    assert report.row_target(rows, rows[0]) == "≥ 90% of copy: 93.5% met"
    assert report.row_target(rows, rows[3]) == "≥ 1.3× the best torch.compile: 1.60× met"  # best is 8 ms
    assert report.row_target(rows, rows[5]) == "≥ 2× the best torch.compile: 1.60× NOT met"
    assert report.row_target(rows, rows[1]) is None
    md = report.to_markdown(rows, [], meta(cuda=True))
    assert "| GPU: masked-CAM forward (the CAM pass) ≥ 90% of the copy bandwidth measured in the same run " \
           "(paper's shapes) | met: worst 93.5%" in md
    assert "am_step forward + backward ≥ 2× faster than the best torch.compile (the fused AM step: logits, " \
           "KP at X, one dX) (paper's shapes) | NOT met: worst 1.6×" in md
    assert "≥ 1.5×" not in md


def test_a_cpu_run_says_no_gpu_number_is_measured():
    rows = [dict(r, provider="torch") for r in gpu_rows()]
    tput = [dict(kind="train", backend="triton", N=2, size=512, ms="", images_per_s="", full_pass_h="",
                 note="skipped: needs a CUDA device; the interpreter is not a speed path"),
            dict(kind="cam", backend="torch", N=2, size=512, ms="500.0", images_per_s="4.00", full_pass_h="7.79",
                 note="")]
    md = report.to_markdown(rows, tput, meta(cuda=False))
    assert "no GPU was lent to this run: no GPU number here is measured" in md
    assert md.count("not measured: no GPU was lent to this run") == 5
    assert "| CAM pass | torch | 2 | 500.0 | 4.00 | 7.79 |" in md
    csv = report.to_csv(rows, tput, meta(cuda=False)).splitlines()
    assert csv[0].split(",")[-3:] == ["images_per_s", "full_pass_h", "note"] and len(csv) == 1 + len(rows) + 2


@pytest.mark.parametrize("argv, message", [
    (["--ops", "masked_cam,nope"], r"--ops: unknown \['nope'\]; choose from masked_cam,masked_gap,kp_distance,am_step"),
    (["--layout", "nhwc"], r"argument --layout: invalid choice: 'nhwc'"),
])
def test_bad_options_end_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert re.search(message, capsys.readouterr().err.splitlines()[-1])


@pytest.mark.parametrize("op, provider, backward, kernels_run", [
    ("masked_gap", "torch", False, False), ("masked_gap", "triton", False, True),
    ("am_step", "torch", True, False), ("am_step", "triton_unfused", True, True), ("am_step", "triton", True, True)])
def test_each_provider_runs_on_its_own_backend(op, provider, backward, kernels_run):
    """The backend is bound to the provider's callable (the kernels run under the interpreter
    here), and its forward agrees with the reference's."""
    op = providers.OPS[op]
    tensors = op.inputs((2, 3, 8, 3, 5), torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0),
                        torch.contiguous_format)
    with launches() as seen:
        out = providers.function(op, provider, backward)(*tensors)
    assert bool(seen) == kernels_run
    want = op.forward["numpy"](*providers.as_numpy(tensors))
    for got, ref in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,)):
        np.testing.assert_allclose(got.detach().double().numpy(), ref, rtol=1e-4, atol=1e-5)
