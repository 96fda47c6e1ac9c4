"""`lamscale plot`: the curves it draws are the scalars a run logged (hand-written events), on a step or a
wall-clock axis; a missing tag or a folder without events is one line."""
import json
import subprocess
import sys

from torch.utils.tensorboard import SummaryWriter

from conftest import lamscale_env


def _run_with(folder, points):
    writer = SummaryWriter(str(folder / "tb"))
    for step, wall, value in points:
        writer.add_scalar("val/top1", value, step, walltime=wall)
        writer.add_scalar("train/loss", 1.0 / step, step, walltime=wall)
    writer.close()


def test_plot_draws_the_logged_points_by_step_and_minutes(tmp_path, repo_root):
    _run_with(tmp_path / "a", [(100, 1000.0, 50.0), (200, 1060.0, 70.5), (300, 1150.0, 80.25)])
    _run_with(tmp_path / "b", [(100, 5000.0, 40.0), (200, 5030.0, 60.0)])
    out = tmp_path / "docs" / "curve.png"
    cmd = [sys.executable, "-m", "lamscale", "plot", str(tmp_path / "a"), str(tmp_path / "b"), "--x", "minutes",
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=repo_root, env=lamscale_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads(out.with_suffix(".json").read_text())["curves"]["val/top1"]
    assert curves[str(tmp_path / "a")] == {"x": [0.0, 1.0, 2.5], "y": [50.0, 70.5, 80.25]}
    assert curves[str(tmp_path / "b")] == {"x": [0.0, 0.5], "y": [40.0, 60.0]}
    assert "val/top1" in done.stdout and "last 80.25 at minutes 2.5" in done.stdout

    by_step = subprocess.run([*cmd[:5], "--tag", "val/top1", "--tag", "train/loss", "--out", str(out)], cwd=repo_root,
                             env=lamscale_env(), capture_output=True, text=True, timeout=120)
    assert by_step.returncode == 0, by_step.stderr
    loss = json.loads(out.with_suffix(".json").read_text())["curves"]["train/loss"][str(tmp_path / "a")]
    assert loss["x"] == [100, 200, 300] and loss["y"][0] == 0.01


def test_unknown_tag_and_empty_folder_are_one_line(tmp_path, repo_root):
    _run_with(tmp_path / "a", [(1, 0.0, 1.0)])
    for args, message in [([str(tmp_path / "a"), "--tag", "val/top9"], "no scalar 'val/top9'; it has train/loss, val/top1"),
                          ([str(tmp_path)], f"{tmp_path}: no TensorBoard scalars under {tmp_path}/tb")]:
        done = subprocess.run([sys.executable, "-m", "lamscale", "plot", *args, "--out", str(tmp_path / "x.png")],
                              cwd=repo_root, env=lamscale_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert message in done.stderr, done.stderr
