"""Schedule configs: round trips, defaults for old files, and clear errors for bad ones."""
import pathlib

import pytest

from cellkern.train.config import RuleConfig, ScheduleConfig, StageConfig, config_from_dict, load_config, save_config
from cellkern.train.config import default_stages

DATA = pathlib.Path(__file__).parent / "data"


def test_default_schedule_is_the_spec_table():
    stages = ScheduleConfig().validate().stages
    assert [s.plasticity_profile for s in stages] == ["discovery", "learning", "learning", "consolidation", "freeze"]
    assert [s.activity_threshold for s in stages] == [0.01, 0.02, 0.03, 0.05, 0.1]
    assert [s.clustering_enabled for s in stages] == [False, False, True, True, True]
    assert [s.sparse_keep for s in stages] == [1.0, 1.0, 1.0, 0.3, 0.3]
    assert stages[0].dims == (16, 16, 16) and stages[-1].dims == (30, 40, 40)


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_round_trip(tmp_path, suffix):
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    cfg = ScheduleConfig(budget="2GB", checkpoint_every=7, rule=RuleConfig(stdp_lr=0.02)).validate()
    cfg.stages[1].activity_threshold = None
    path = save_config(cfg, tmp_path / f"s{suffix}")
    assert load_config(path) == cfg


def test_old_config_keeps_working():
    cfg = load_config(DATA / "schedule_v1.toml")
    assert cfg.seed == 3 and len(cfg.stages) == 2
    st = cfg.stages[1]
    assert st.dims == (10, 12, 12) and st.activity_threshold is None and st.sparse_keep == 1.0
    assert cfg.rule == RuleConfig() and cfg.monitor_every == 50 and cfg.checkpoint_every is None


def test_missing_stages_take_the_default_schedule():
    assert config_from_dict({"seed": 1}).stages == default_stages()


@pytest.mark.parametrize("data, where", [
    ({"sed": 1}, "'sed'"),
    ({"rule": {"stdp_rate": 0.1}}, "in rule: 'stdp_rate'"),
    ({"stages": [{"name": "a", "dim": [4, 4, 4]}]}, "in stages[0]: 'dim'"),
])
def test_unknown_keys_are_named(data, where):
    with pytest.raises(ValueError, match="unknown key") as exc:
        config_from_dict(data)
    assert where in str(exc.value)


@pytest.mark.parametrize("data, err, words", [
    ({"seed": "0"}, TypeError, "seed must be an integer, got str"),
    ({"batch": 2.5}, TypeError, "batch must be an integer"),
    ({"leak": "fast"}, TypeError, "leak must be a number"),
    ({"stages": [{"steps": True}]}, TypeError, "stages[0].steps must be an integer, got bool"),
    ({"stages": [{"clustering_enabled": 1}]}, TypeError, "clustering_enabled must be true or false"),
    ({"stages": [{"dims": "16x16x16"}]}, TypeError, "dims must be a list of 3 integers"),
    ({"stages": [{"dims": [4, 4.5, 4]}]}, TypeError, "dims must hold integers"),
    ({"rule": {"w_min": "0.1"}}, TypeError, "rule.w_min must be a number"),
])
def test_wrong_types(data, err, words):
    with pytest.raises(err) as exc:
        config_from_dict(data)
    assert words in str(exc.value)


@pytest.mark.parametrize("dims", [[0, 4, 4], [4, -1, 4], [4, 4]])
def test_dims_must_be_three_positive_ints(dims):
    with pytest.raises(ValueError, match=r"stages\[0\].dims must"):
        config_from_dict({"stages": [{"dims": dims}]})


@pytest.mark.parametrize("data, words", [
    ({"stages": [{"sparse_keep": 0.0}]}, "sparse_keep must be in (0, 1]"),
    ({"stages": [{"plasticity_profile": "cram"}]}, "plasticity_profile must be one of"),
    ({"stages": [{"steps": 0}]}, "steps must be > 0"),
    ({"stages": []}, "non-empty"),
    ({"stencil": "hex"}, "stencil must be one of"),
    ({"leak": 1.5}, "leak must be in [0, 1]"),
    ({"rule": {"w_min": 3.0}}, "w_min must be <= rule.w_max"),
])
def test_bad_values(data, words):
    with pytest.raises(ValueError) as exc:
        config_from_dict(data)
    assert words in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ValueError, match=r"\.toml, \.yaml or \.yml"):
        load_config(tmp_path / "c.json")
    (tmp_path / "bad.toml").write_text("seed = = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_stage_config_validates_directly():
    with pytest.raises(ValueError, match="stage.dims must be positive"):
        StageConfig(dims=(0, 1, 1)).validate()
