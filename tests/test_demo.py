"""The README's main command, `vllm-recontrol demo`, run as a new user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end_and_control_beats_base(tmp_path):
    command = [str(Path(sys.executable).parent / "vllm-recontrol"), "demo",
               "--workdir", str(tmp_path / "demo")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0] in ("base", "re-control", "best-of-4"):
            rows.setdefault(cells[0], []).append(cells)
    assert set(rows) == {"base", "re-control", "best-of-4"}, proc.stdout[-3000:]
    base_reward, base_diversity = float(rows["base"][0][4]), float(rows["base"][0][5])
    best = max(rows["re-control"], key=lambda r: float(r[4]))
    assert float(best[4]) > base_reward + 0.2
    assert float(best[5]) > 0.9 * base_diversity  # the bar: diversity within 10%
    assert (tmp_path / "demo" / "eval" / "reward_vs_throughput.png").is_file()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    header = next(line for line in readme.splitlines() if line.startswith("| method | alpha |"))
    assert header in proc.stdout.splitlines()  # the README shows the table the demo prints
