import pytest

from lamscale.config import EVAL_MAY_CHANGE, ConfigError, load_config, resume_changes


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


@pytest.mark.parametrize("override, named", [
    ("train.lr=-1", "train.lr: expected a positive value, got -1.0"),
    ("train.lr=0", "train.lr: expected a positive value"),
    ("train.lr=nan", "train.lr: expected a finite number, got 'nan'"),
    ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("model.dropout=-.inf", "model.dropout: expected a finite number"),
    ("train.warmup_steps=-5", "train.warmup_steps: expected 0 or more, got -5"),
    ("train.grad_clip=-1", "train.grad_clip: expected 0 or more"),
    ("train.weight_decay=-0.1", "train.weight_decay: expected 0 or more"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio: expected a value in [0, 1]"),
    ("train.seed=-1", "train.seed"),
    ("model.dropout=1", "model.dropout: expected a value in [0, 1)"),
    ("data.clip_len=0", "data.clip_len"),
    ("task.w_giou=-1", "task.w_giou"),
    ("cluster.cpus_per_worker=0", "cluster.cpus_per_worker"),
    ("cluster.max_failures=-2", "cluster.max_failures"),
    # YAML 1.1 reads these as 16, 8, 1000, 5 and 90: a command line means none of them
    ("train.max_steps=0x10", "train.max_steps: expected a decimal integer, got '0x10'"),
    ("train.max_steps=010", "train.max_steps: expected a decimal integer, got '010'"),
    ("train.max_steps=1_000", "train.max_steps: expected a decimal integer, got '1_000'"),
    ("data.batch_size=0b101", "data.batch_size: expected a decimal integer, got '0b101'"),
    ("train.max_steps=1:30", "train.max_steps: expected a decimal integer, got '1:30'"),
    ("train.lr=1_0.5", "train.lr: expected a number, got '1_0.5'"),
    ("model.lam.layers=[1,1]", "model.lam.layers: layer index 1 listed twice"),
    ("model.lam.layers=[]", "write `none` for the baseline"),
    ("run.name=../x", "run.name: '../x'"),
    ("run.name=a/b", "run.name: 'a/b'"),
    ("run.name=.", "run.name: '.'"),
    ("run.name=..", "run.name: '..'"),
    ("run.name=/tmp/abs", "run.name: '/tmp/abs'"),
    ("run.name=", "run.name: empty"),
    ("model.lam.backend=triton", "model.lam.backend: triton needs CUDA GPUs"),
    ("model.lam.backend=sdpa", "model.lam.backend: sdpa computes combine=add with bound=none only"),
])
def test_bad_ranges_and_literals_name_key_and_value(repo_root, override, named, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs" / "tiny.yaml", [override])
    assert named in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_backend_must_fit_the_device(repo_root, monkeypatch):
    tiny = repo_root / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="model.lam.backend: cpp is the CPU kernel, but cluster.use_gpu=true"):
        load_config(tiny, ["model.lam.backend=cpp", "cluster.use_gpu=true"])
    with pytest.raises(ConfigError, match="model.lam.backend: sdpa .* not combine=add bound=sigmoid"):
        load_config(tiny, ["model.lam.backend=sdpa", "model.lam.combine=add", "model.lam.bound=sigmoid"])
    assert load_config(tiny, ["model.lam.backend=sdpa", "model.lam.combine=add"]).model.lam.backend == "sdpa"
    assert load_config(tiny, ["model.lam.backend=sdpa", "model.lam.layers=none"]).model.lam.layers == "none"
    assert load_config(tiny, ["model.lam.backend=triton", "cluster.use_gpu=true"]).cluster.use_gpu
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs triton kernels on CPU tensors
    assert load_config(tiny, ["model.lam.backend=triton"]).model.lam.backend == "triton"


def test_plain_literals_still_parse_and_strings_stay_as_typed(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml",
                      ["train.warmup_steps=+7", "train.lr=2e-3", "train.grad_clip=0", "run.name=2024",
                       "model.lam.layers=[1, 0]", "train.min_lr_ratio=1", "data.val=shards/tiny/val-{000000..000000}.tar"])
    assert cfg.train.warmup_steps == 7 and cfg.train.lr == 0.002 and cfg.train.grad_clip == 0.0
    assert cfg.run.name == "2024" and cfg.model.lam.layers == [1, 0] and cfg.train.min_lr_ratio == 1.0
    assert cfg.data.val == "shards/tiny/val-{000000..000000}.tar"


def test_resume_changes_lists_only_keys_a_checkpoint_cannot_take(repo_root):
    stored = load_config(repo_root / "configs" / "tiny.yaml").to_dict()
    stored["model"]["retired_key"] = 3  # a key this version no longer has is not compared
    cfg = load_config(repo_root / "configs" / "tiny.yaml",
                      ["model.dim=64", "data.batch_size=8", "cluster.num_workers=1", "train.zero_stage=3",
                       "model.lam.layers=[0]", "train.lr=0.01",
                       # these may change on resume
                       "train.max_steps=900", "train.eval_every=7", "train.ckpt_every=9", "train.keep_last=5",
                       "train.min_lr_ratio=0.5", "cluster.max_failures=3", "cluster.address=auto",
                       "data.on_error=skip", "data.read_retry_s=5", "train.mask_images=false", "run.name=other"])
    assert resume_changes(stored, cfg) == [
        "model.dim: 128 -> 64", "model.lam.layers: 'all' -> [0]", "data.batch_size: 16 -> 8",
        "train.lr: 0.001 -> 0.01", "train.zero_stage: 2 -> 3", "cluster.num_workers: 2 -> 1"]
    assert resume_changes(stored, load_config(repo_root / "configs" / "tiny.yaml")) == []


def test_eval_may_change_how_it_decodes_not_what_the_checkpoint_holds(repo_root):
    stored = load_config(repo_root / "configs" / "tiny.yaml").to_dict()
    cfg = load_config(repo_root / "configs" / "tiny.yaml",
                      ["task.nms_iou=0.5", "data.batch_size=4", "model.lam.backend=dense",  # these may change
                       "model.heads=2", "cluster.num_workers=1"])
    assert resume_changes(stored, cfg, EVAL_MAY_CHANGE) == ["model.heads: 4 -> 2", "cluster.num_workers: 2 -> 1"]
    other = load_config(repo_root / "configs" / "tiny.yaml", ["task.name=classification"])
    assert "task.name: 'moment_retrieval' -> 'classification'" in resume_changes(stored, other, EVAL_MAY_CHANGE)
