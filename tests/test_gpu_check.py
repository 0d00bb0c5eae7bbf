"""bench/gpu_check.py (`make gpu-check`): one skip line per step without CUDA and nothing written;
with a (faked) GPU, each step's numbers come from its own output and land in OUT/<device>/; bad
options end with one line. No step really runs here."""
import json
import os
import re
import sys

import pytest
import torch

from bench import gpu_check
from minimal_amkp.run import outdir

STEPS = ["kernel-tests", "bench", "throughput", "run-tiny", "run-paper"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_without_cuda_every_step_is_skipped_with_one_line_and_nothing_is_written(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{s}: skipped: no CUDA device" for s in STEPS] + [
        "gpu-check: nothing measured, nothing written (no CUDA device)"]
    assert not any(tmp_path.iterdir())


def fake_execute(command, timeout, cwd, env):
    """What each step's child would print; the paper run also leaves its outputs."""
    if "pytest" in command:
        assert env["AMKP_TEST_EXAMPLES"] == "3" and "TRITON_INTERPRET" not in env
        return 0, 50.0, [(1.0, "....."), (50.0, "===== 81 passed in 49.90s =====")]
    if command[1:3] == ["-m", "bench"]:
        assert "--no-throughput" in command and command[-2:] == ["--out", os.path.join(env["OUT"], "nvidia-h200")]
        return 0, 150.0, [(9.0, "NVIDIA H200: copy bandwidth 4300.00 GB/s, the best copy_"),
                          (150.0, "wrote x.csv and .md")]
    if command[1:3] == ["-m", "bench.throughput"]:
        return 0, 40.0, [(30.0, "throughput   train torch  N=64 512px      109.0 ms    587.00 img/s"),
                         (40.0, "throughput   train triton: failed: RuntimeError: x")]
    out = command[command.index("--out") + 1]
    bars = [(12.5, "phantom: 256/256 images, 12.3 s"),
            (20.0, "base epoch 1/1  5/5  loss 0.3  600 img/s  0:00 left  (0:07)")]
    if "paper" not in command:
        return None, 60.0, bars  # timed out
    os.makedirs(out)
    for name in gpu_check.RUN_OUTPUTS + ("figures/a.png",):
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        with open(os.path.join(out, name), "w") as f:
            f.write("x")
    with open(os.path.join(out, outdir.MANIFEST), "w") as f:
        json.dump({"program": "minimal_amkp", "files": [*gpu_check.RUN_OUTPUTS, "figures/a.png"]}, f)
    return 0, 80.0, bars + [(79.0, "done in 1:19: mean Acc ..."),
                            (79.5, f"{gpu_check.PEAK} {3 * 2 ** 30} bytes")]


def test_with_a_gpu_each_number_comes_from_its_step_and_is_written_per_device(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(gpu_check, "execute", fake_execute)
    monkeypatch.setenv("AMKP_COMMIT", "abc123")
    monkeypatch.setenv("OUT", str(tmp_path))  # for fake_execute's check of the bench's --out
    assert gpu_check.main(["--out", str(tmp_path)]) == 1  # the tiny run timed out
    out = capsys.readouterr().out
    assert "run-tiny: timed out after 50 s in 60 s" in out and "run-paper: ok in 80 s" in out
    folder = tmp_path / "nvidia-h200"
    got = json.loads((folder / "gpu-check.json").read_text())
    assert (got["device"], got["commit"], got["torch"]) == ("NVIDIA H200", "abc123", torch.__version__)
    steps = {s["step"]: s for s in got["steps"]}
    assert [s["timeout_s"] for s in got["steps"]] == list(gpu_check.STEPS.values())
    assert steps["kernel-tests"]["counts"] == {"passed": 81} and steps["kernel-tests"]["status"] == "ok"
    assert steps["bench"]["lines"] == ["NVIDIA H200: copy bandwidth 4300.00 GB/s, the best copy_",
                                       "wrote x.csv and .md"]
    assert steps["throughput"]["lines"][1] == "throughput   train triton: failed: RuntimeError: x"
    tiny, paper = steps["run-tiny"], steps["run-paper"]
    assert tiny["status"] == "timed out after 50 s" and tiny["outputs"].startswith("not checked")
    assert tiny["peak_gpu_gib"] is None and tiny["summary"] == ""
    assert paper["phases"] == [["phantom generation", 12.3, 12.5], ["base epoch 1/1", 7, 20.0]]
    assert (paper["peak_gpu_gib"], paper["outputs"], paper["status"]) == (3.0, "all written", "ok")
    md = (folder / "gpu-check.md").read_text()
    assert "| run-tiny | python -m minimal_amkp --out TMP (tiny preset, phantom generated) | timed out after 50 s | " \
           "60.0 | 50 |" in md
    assert "- peak GPU memory (torch.cuda.max_memory_allocated): 3.0 GiB" in md
    assert (folder / "gpu-check-run-paper.log").read_text().splitlines()[0] == \
        "[   12.5 s] phantom: 256/256 images, 12.3 s"


def test_a_finished_run_missing_an_output_fails(tmp_path):
    (tmp_path / outdir.MANIFEST).write_text(json.dumps({"program": "minimal_amkp", "files": ["report.md"]}))
    (tmp_path / "report.md").write_text("")
    assert gpu_check.missing_outputs(str(tmp_path)) == sorted(gpu_check.RUN_OUTPUTS)


def test_make_test_gpu_runs_the_kernel_tests_compiled_with_few_examples():
    command, env = gpu_check.kernel_tests(3)
    assert command[-5:] == list(gpu_check.KERNEL_TESTS) and all(os.path.isfile(os.path.join(gpu_check.ROOT, t))
                                                                  for t in gpu_check.KERNEL_TESTS)
    assert env["AMKP_TEST_EXAMPLES"] == "3" and "TRITON_INTERPRET" not in env
    assert env["PYTHONPATH"].split(os.pathsep)[0] == gpu_check.ROOT


@pytest.mark.parametrize("argv, message", [
    (["--steps", "bench,nope"], r"--steps: unknown \['nope'\]; choose from kernel-tests,bench,throughput,run-tiny,"),
    (["--budget", "0"], r"--budget must be a positive number of seconds, got 0"),
    (["--examples", "0"], r"--examples must be >= 1, got 0"),
    (["--stpes", "bench"], r"unrecognized arguments: --stpes bench"),
])
def test_bad_options_end_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        gpu_check.main(argv)
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err.splitlines()[-1])


def test_a_run_goes_through_the_wrapper_as_python_m_minimal_amkp(tmp_path):
    rc, _, lines = gpu_check.execute([sys.executable, "-c", gpu_check.RUN_WRAPPER, "--no-such-option"],
                                     60, str(tmp_path), gpu_check.child_env())
    assert rc == 2 and lines[-1][1] == "minimal_amkp: error: unrecognized arguments: --no-such-option"


def test_a_step_past_its_timeout_is_killed_and_keeps_what_it_printed(tmp_path):
    child = "import time; print('drawing\\rdrawn', flush=True); time.sleep(60)"
    rc, _, lines = gpu_check.execute([sys.executable, "-c", child], 1.0, str(tmp_path), gpu_check.child_env())
    assert rc is None and [line for _, line in lines] == ["drawn"]


def test_the_paper_run_is_a_command_line_the_cli_takes(tmp_path):
    from minimal_amkp.run import cli
    cfg, *_ = cli.parse([*gpu_check.PAPER_RUN, "--out", str(tmp_path)])
    assert (cfg.run.preset, cfg.run.backend) == ("paper", "triton")
    assert cfg.data.image_size == cfg.data.phantom_size == 512
    assert (cfg.train.base_epochs, cfg.train.msa_frozen_epochs, cfg.train.msa_epochs, cfg.mine.epochs) == (1, 1, 1, 1)
    assert cfg.model.blocks == (3, 4, 6, 3) and cfg.mine.rounds == 3  # the paper's network and T
