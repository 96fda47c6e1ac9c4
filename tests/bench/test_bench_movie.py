"""`lamscale bench movie`: grounding's whole-movie forward with the sample model at 4.5k and 18k frames, each in a
fresh process; its peak memory must grow linearly with the movie (a dense N×N step would be 16×). (The default
lengths reach 36k frames; 4× the frames is what the linearity check needs, at a quarter of the time.)"""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_an_18k_frame_movie_runs_in_one_forward_in_linear_memory(repo_root, tmp_path):
    out = tmp_path / "movie"
    done = subprocess.run([sys.executable, "-m", "lamscale", "bench", "movie", "--lengths", "4500,18000",
                           "--out", str(out)], cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["frames"] for r in rows] == [4500, 18000] and not any("error" in r for r in rows), rows
    small, movie = rows
    assert movie["N"] == 18000 + 12  # frames + the sentence's tokens, one sequence
    # 4× the tokens: linear memory is ~4× (slack for allocator granularity); quadratic would be 16×
    assert 2.0 < movie["peak_mib"] / small["peak_mib"] < 6.0, rows
    assert out.with_suffix(".png").exists() and "18000" in out.with_suffix(".md").read_text()
