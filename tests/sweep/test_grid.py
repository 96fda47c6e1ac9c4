"""The sweep's grid: the paper's variants as configs, vanilla trials once per seed, a parameter-matched control."""
import pytest

from lamscale.config import ConfigError
from lamscale.sweep.grid import parameter_count, parse_grid, trial_configs, trials


def test_variants_and_lam_keys_expand_without_repeating_vanilla():
    grid = parse_grid(["variant=vanilla,lam-all", "combine=mul,add"])
    names = [t.name for t in trials(grid, 2)]
    assert names == ["vanilla_seed0", "vanilla_seed1", "lam-all_combine-mul_seed0", "lam-all_combine-mul_seed1",
                     "lam-all_combine-add_seed0", "lam-all_combine-add_seed1"]
    t = trials(grid, 2)[4]
    assert t.overrides == ["model.lam.layers=all", "model.lam.combine=add", "train.seed=0"] and t.seed == 0


def test_vanilla_plus_params_matches_lam_all_within_one_hidden_unit(tmp_path):
    grid = parse_grid(["variant=vanilla,vanilla+params,lam-first,lam-all"])
    configs = trial_configs("configs/tiny.yaml", [], trials(grid, 1), str(tmp_path))
    counts = {name: parameter_count(cfg) for name, cfg in configs.items()}
    vanilla, matched, first, every = (counts[f"{v}_seed0"] for v in ("vanilla", "vanilla-plus-params", "lam-first", "lam-all"))
    assert vanilla < first < every
    dim, layers = configs["vanilla_seed0"].model.dim, configs["vanilla_seed0"].model.layers
    assert abs(matched - every) <= layers * (2 * dim + 1)  # one hidden unit per layer is the step
    assert configs["vanilla-plus-params_seed0"].model.extra_mlp > 0 and configs["vanilla-plus-params_seed0"].model.lam.layers == "none"
    assert configs["lam-all_seed0"].run.storage == str(tmp_path) and configs["lam-all_seed0"].run.name == "lam-all_seed0"


@pytest.mark.parametrize("spec, message", [
    ("variant", "expected key=value1,value2"), ("variant=", "expected key=value1,value2"),
    ("variant=lam-most", "unknown ['lam-most']"),
])
def test_bad_grid_specs_are_one_line(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_grid([spec])


def test_a_bad_value_names_the_trial(tmp_path):
    grid = parse_grid(["variant=lam-all", "combine=mul,sum"])
    with pytest.raises(ConfigError, match=r"sweep trial lam-all_combine-sum_seed0: .*model\.lam\.combine"):
        trial_configs("configs/tiny.yaml", [], trials(grid, 1), str(tmp_path))


def test_a_grid_without_variants_sweeps_the_config_as_it_is(tmp_path):
    grid = parse_grid(["combine=mul,add"])
    assert [t.name for t in trials(grid, 1)] == ["combine-mul_seed0", "combine-add_seed0"]
    with pytest.raises(ConfigError, match=r"sweep trial combine-bad_seed0: .*model\.lam\.combine"):
        trial_configs("configs/tiny.yaml", [], trials(parse_grid(["combine=mul,bad"]), 1), str(tmp_path))
