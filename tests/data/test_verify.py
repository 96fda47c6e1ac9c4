"""`lamscale shards verify` finds tampered shards and corrupt samples, one line naming shard and key;
`lamscale shards stats` describes a dataset."""
import json
import tarfile

import pytest

from lamscale import cli
from test_builders import write_msrvtt

BUILD = ["shards", "build", "--format", "msrvtt", "--max-per-shard", "2"]


@pytest.fixture
def dataset(tmp_path, capsys):
    """MSR-VTT shards, at most 2 samples each: train has 3 videos in 2 shards, validate 1 in 1."""
    write_msrvtt(tmp_path / "msrvtt", n_videos=4)
    out = tmp_path / "shards"
    assert cli.main([*BUILD, str(tmp_path / "msrvtt"), "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def run(capsys, *args):
    code = cli.main(["shards", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def member_span(shard, name):
    """(offset, size) of a member's data inside the tar file."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(name)
        return member.offset_data, member.size


def overwrite(shard, offset, data):
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_clean_dataset_verifies(dataset, capsys):
    code, lines, _ = run(capsys, "verify", dataset)
    assert code == 0 and lines == [f"{dataset}: 3 shards, 4 samples checked: OK"]


def test_tampered_shard_is_a_sha_mismatch_naming_the_shard(dataset, capsys):
    shard = dataset / "train-000000.tar"
    offset, size = member_span(shard, "video0.json")
    text = shard.read_bytes()[offset:offset + size]
    overwrite(shard, offset, text.replace(b"caption 0 of video 0", b"caption X of video 0"))  # still valid json
    code, lines, _ = run(capsys, "verify", dataset)
    assert code == 1
    assert lines[:-1] == [next(l for l in lines if "sha256 mismatch" in l)]  # one line, nothing else wrong
    assert lines[0].startswith(f"{shard}: sha256 mismatch (manifest ")
    assert lines[-1].endswith("1 problem(s)")


def test_corrupt_sample_is_one_line_naming_shard_and_key(dataset, capsys):
    shard = dataset / "train-000000.tar"
    offset, size = member_span(shard, "video1.video.npy")
    overwrite(shard, offset, b"\x00garbage" * (size // 8))
    code, lines, _ = run(capsys, "verify", dataset)
    assert code == 1
    bad = [l for l in lines if "video1" in l]
    assert len(bad) == 1 and bad[0].startswith(f"{shard}: sample 'video1': cannot decode video.npy (")
    assert any(l.startswith(f"{shard}: sha256 mismatch") for l in lines)


def test_missing_and_truncated_shards_are_named(dataset, capsys):
    (dataset / "validate-000000.tar").unlink()
    shard = dataset / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    code, lines, _ = run(capsys, "verify", dataset)
    assert code == 1
    assert f"{dataset / 'validate-000000.tar'}: missing (listed in manifest.json)" in lines
    assert f"{shard}: 700 bytes, manifest says 10240" in lines
    assert any(l.startswith(f"{shard}: not a readable tar after 0 samples (") for l in lines)
    assert f"{shard}: 0 samples, manifest says 1" in lines


def test_wrong_member_dims_against_the_manifest(dataset, capsys):
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["feature_dims"]["video"] = 32
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    code, lines, _ = run(capsys, "verify", dataset)
    assert code == 1 and f"{dataset / 'train-000000.tar'}: sample 'video0': video.npy is 16-d, manifest says 32" in lines


def test_no_manifest_is_one_error_line(tmp_path, capsys):
    code, _, err = run(capsys, "verify", tmp_path)
    assert code == 2 and err.strip() == f"lamscale: error: {tmp_path}/manifest.json does not exist (build the dataset with `lamscale shards build`)"


def test_stats_table_histogram_and_png(dataset, tmp_path, capsys):
    code, lines, _ = run(capsys, "stats", dataset, "--png", tmp_path / "lengths.png")
    assert code == 0
    text = "\n".join(lines)
    assert lines[0] == f"{dataset}: format msrvtt, schema 1, feature dims {{'video': 16, 'audio': 8}}"
    rows = {l.split()[0]: l.split()[1:5] for l in lines[2:4]}
    # rejected counts inputs (captions): video0's empty one
    assert rows == {"train": ["2", "3", "1", rows["train"][3]], "validate": ["1", "1", "0", rows["validate"][3]]}
    assert "train video length: min 8, median 9, mean 9.0, max 10" in text  # videos 0, 1, 2: 8, 9, 10 rows
    assert "  [      8,      16)         3  ########################################" in lines
    assert "train captions: 6 (2.0 per sample)" in text
    assert (tmp_path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
