import pytest

from lamscale.config import ConfigError, load_config


def test_tiny_loads_with_defaults_and_name(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml")
    assert cfg.run.name == "tiny"
    assert cfg.model.lam.layers == "all" and cfg.train.zero_stage == 2 and cfg.cluster.num_workers == 2


def test_qvhighlights_config_has_real_dims(repo_root):
    cfg = load_config(repo_root / "configs" / "qvhighlights.yaml")
    assert (cfg.model.video_dim, cfg.model.text_dim, cfg.model.max_clips) == (2816, 512, 75)


def test_dotted_overrides_are_parsed_as_yaml(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml",
                      ["train.max_steps=7", "model.lam.layers=[0]", "train.lr=3e-4", "model.checkpointing=false"])
    assert cfg.train.max_steps == 7 and cfg.model.lam.layers == [0]
    assert cfg.train.lr == 3e-4 and cfg.model.checkpointing is False


@pytest.mark.parametrize("override, named", [
    ("model.dimm=3", "model.dimm"),
    ("train.max_steps=abc", "train.max_steps"),
    ("model.lam.combine=times", "model.lam.combine"),
    ("model.lam.layers=[0, 9]", "model.lam.layers"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("model.heads=3", "model.dim"),
    ("cluster.num_workers=0", "cluster.num_workers"),
    ("model.checkpointing=maybe", "model.checkpointing"),
    ("nokey", "key=value"),
])
def test_bad_values_name_the_key(repo_root, override, named):
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs" / "tiny.yaml", [override])
    message = str(err.value)
    assert named in message and "\n" not in message
    assert "tiny.yaml" in message or "override" in message


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
