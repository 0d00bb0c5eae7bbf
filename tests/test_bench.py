"""bench/: the targets and verdicts its report prints, from rows made up here (no timing runs), its
modes and budgets, and that each provider runs the ops on its own backend."""
import re
import time

import numpy as np
import pytest
import torch

import bench.__main__ as cli
from bench import providers, report
from kernel_testing import launches

PAPER, AM = (64, 8, 768, 32, 32), (64, 14, 768, 32, 32)


class Args:
    quick, cuda_graphs, max_gb, note, mode, budget, no_compile = False, True, 35.0, "", "default", 160.0, False


def meta(cuda):
    class Device:
        type = "cuda" if cuda else "cpu"
    return report.metadata("H200" if cuda else "CPU AMD EPYC", Args, Device, 0.5, "channels_last") | \
        {"copy": "4000 GB/s"}


def row(op, shape, provider, pass_, ms, pct=""):
    return dict(op=op, shape=shape, dtype="bfloat16", provider=provider, pass_=pass_, ms=str(ms), reps="",
                gbps="1.0", pct_copy=str(pct), pct_spec="", compile_s="", note="")


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
    (["--quick", "--full"], r"argument --full: not allowed with argument --quick"),
    (["--budget", "-5"], r"--budget must be a number of seconds >= 0 \(0: no limit\), got -5"),
    (["--compile-budget", "nan"], r"--compile-budget must be a number of seconds >= 0"),
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


def test_a_gpu_row_above_copy_says_so_and_meets_no_target():
    """A GPU row faster than the copy baseline is a bug in the baseline or the bytes model: flagged
    on its row, its target not counted; on a CPU cache makes such rows real, so none is flagged."""
    blank = row("masked_cam", PAPER, "triton", "fwd", "")
    over = report.measured(blank, nbytes=4.4e9, seconds=1e-3, copy_bps=4e12, spec_bps=4.8e12, cuda=True)
    assert (over["ms"], over["gbps"], over["pct_copy"], over["pct_spec"]) == ("1.000", "4400.00", "110.0", "91.7")
    assert over["note"] == report.ABOVE_COPY == "ABOVE COPY: check the bytes model/baseline"
    assert report.measured(blank, 4.4e9, 1e-3, 4e12, None, cuda=False)["note"] == ""
    assert report.measured(blank, 4.4e9, 1e-3, 4e12, None, cuda=False)["pct_spec"] == "spec unknown"
    under = report.measured(blank | dict(shape=AM), 3.8e9, 1e-3, 4e12, 4.8e12, cuda=True)
    assert under["note"] == "" and report.row_target([under], under) == "≥ 90% of copy: 95.0% met"

    fast = report.measured(row("masked_cam", PAPER, "triton", "fwd+bwd", ""), 9e9, 2e-3, 4e12, 4.8e12, True)
    rows = [over, under, fast, row("masked_cam", PAPER, "compile_max-autotune", "fwd+bwd", 8.0),
            report.measured(row("masked_cam", PAPER, "compile_default", "fwd", ""), 4.2e9, 1e-3, 4e12, None, True)]
    assert report.row_target(rows, over) == "≥ 90% of copy: 110.0% not counted, " + report.ABOVE_COPY
    assert report.row_target(rows, fast) == "≥ 1.3× the best torch.compile: 4.00× not counted, " + report.ABOVE_COPY
    md = report.to_markdown(rows, [], meta(cuda=True))
    assert "(paper's shapes) | met: worst 95.0% (64×14×768×32×32: 95.0%); not counted, ABOVE COPY: check the " \
           "bytes model/baseline: 64×8×768×32×32 |" in md
    assert "faster than the best torch.compile (paper's shapes) | not counted, ABOVE COPY: check the bytes " \
           "model/baseline: 64×8×768×32×32 |" in md
    compiled = next(line for line in md.splitlines() if line.startswith("| 64×8×768×32×32 | compile_default |"))
    assert compiled.endswith("| fwd: ABOVE COPY: check the bytes model/baseline |")
    assert "- spec memory bandwidth: 4800 GB/s (data sheet)" in md


@pytest.mark.parametrize("name, bps", [
    ("NVIDIA H200", 4.8e12), ("NVIDIA H200 NVL", 4.8e12), ("NVIDIA GH200 480GB", None),
    ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H100 NVL", 3.9e12),
    ("NVIDIA A100-SXM4-80GB", 2.039e12), ("NVIDIA A100 80GB PCIe", 1.935e12), ("NVIDIA A100-SXM4-40GB", 1.555e12),
    ("Tesla T4", None), ("CPU AMD EPYC 7B13 (2 cores)", None)])
def test_spec_bandwidth_is_known_only_for_parts_the_name_pins_down(name, bps):
    assert report.spec_bandwidth(name) == bps


def test_the_modes_choose_shapes_compiles_and_budgets():
    default, quick, full = cli.parse_args([]), cli.parse_args(["--quick"]), cli.parse_args(["--full"])
    assert (default.mode, default.budget, default.compile_budget) == ("default", 160.0, 90.0)
    assert (quick.mode, quick.budget, quick.compile_budget) == ("quick", 50.0, 20.0)
    assert (full.mode, full.budget, full.compile_budget) == ("full", 0.0, 0.0)
    assert cli.parse_args(["--full", "--budget", "30"]).budget == 30.0
    assert cli.shapes_for("masked_cam", "default")[0] == PAPER  # the targets' shapes first
    assert cli.shapes_for("masked_cam", "quick") == tuple(cli.SMALL_SHAPES)
    assert set(cli.shapes_for("masked_cam", "full")) == set(cli.SMALL_SHAPES + cli.PAPER_SHAPES)
    op, cpu = providers.OPS["masked_cam"], torch.device("cpu")

    def reason(args, shape):
        args.max_gb = 2.0
        return cli.skip_reason(op, "compile_max-autotune", shape, args, cpu, 4, False)

    small = cli.SMALL_SHAPES[0]
    with_cxx = reason(full, small)  # None, or the C++ compiler this machine may lack
    assert reason(default, small).startswith("max-autotune runs at the paper's shapes only")
    assert reason(default, PAPER) == with_cxx and reason(quick, small) == reason(default, small)


def test_no_row_starts_once_the_budget_is_spent():
    args = cli.parse_args(["--ops", "kp_distance", "--quick"])
    args.max_gb = 2.0
    rows = cli.bench_op(providers.OPS["kp_distance"], args, torch.device("cpu"), torch.float32,
                        torch.contiguous_format, 1e10, None, [1.0], time.perf_counter() - 1, None)
    assert rows and not any(r["ms"] for r in rows)
    assert {r["note"] for r in rows if r["provider"] in ("torch", "numpy") and r["pass_"] == "fwd"} == \
        {"skipped: --budget spent"}
    assert cli.op_deadline(None, 5.0, 2) is None and cli.op_deadline(100.0, 40.0, 3) == 60.0


def test_the_copy_baseline_takes_every_large_buffer_that_fits():
    mib = 1 << 20
    assert cli.copy_sizes(4e9) == [256 * mib, 512 * mib, 1024 * mib]
    assert cli.copy_sizes(1.5e9) == [256 * mib, 512 * mib]
    assert cli.copy_sizes(100 * mib) == [50 * mib]

    def one_ms(fn):
        fn()
        return 1e-3, None

    bps, text = cli.copy_bandwidth(torch.device("cpu"), [mib, 2 * mib], one_ms)
    assert bps == 2 * 2 * mib / 1e-3 and text.startswith("4.19 GB/s, the best copy_")
    assert text.endswith("of: 1 MiB 2, 2 MiB 4 GB/s")


def test_a_compiled_provider_is_kept_from_shape_to_shape():
    op = providers.OPS["kp_distance"]
    first = providers.function(op, "compile_default", False)
    assert providers.function(op, "compile_default", False) is first
    assert providers.function(op, "compile_default", True) is not first
    providers.forget_compiled()
    assert providers.function(op, "compile_default", False) is not first
    providers.forget_compiled()


def test_help_describes_the_modes(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--full" in out and "designed for <= 3 min on an H200" in out and "designed for <= 60 s" in out
