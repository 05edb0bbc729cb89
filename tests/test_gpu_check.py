"""The prepared GPU check runs every step's code path on CPU (tiny shapes): CUDA-only parts
say "skipped: no GPU" in the report, they never pass silently."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run the full check instead")
def test_gpu_check_cpu_mode(tmp_path):
    p = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["environment", "convert", "throughput", "lora_4bit", "fsdp_compile", "verify", "resume"]
    failed = {
        k: v["status"] for k, v in steps.items() if not (v["status"] == "ok" or v["status"].startswith("skipped"))
    }
    assert not failed and p.returncode == 0, (failed, p.stdout[-2000:])
    assert steps["lora_4bit"]["status"].startswith("skipped: no GPU")
    assert steps["fsdp_compile"]["fsdp"].startswith("skipped: no GPU") and steps["fsdp_compile"]["compile_seconds"] > 0
    assert steps["verify"]["relative_difference"] < 1e-4 and steps["verify"]["tokens"] > 0
    assert steps["resume"]["max_abs_loss_difference"] < 1e-3 and len(steps["resume"]["losses"]) == 12
    assert steps["throughput"]["tokens_per_s"] > 0 and steps["throughput"]["trainer_tokens_per_s"] > 0
    assert steps["convert"]["calibration"]["device"] == "cpu"
    assert set(report["plots"]) == {"resume.png", "throughput.png"}
