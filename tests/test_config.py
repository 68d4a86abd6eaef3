import pytest

from stackgan_dist.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_are_the_papers_cub_settings():
    c = load_config(None)
    assert (c.model.gf_dim, c.model.df_dim, c.model.condition_dim, c.model.z_dim,
            c.model.res_blocks) == (128, 64, 128, 100, 4)
    assert c.model.text_dim is None  # read from the dataset (the CUB release: 1024-d char-CNN-RNN)
    assert (c.train.lr_g, c.train.beta1) == (2e-4, 0.5)


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  max_steps: 10\nmodel:\n  gf_dim: 32\n")
    c = load_config(p, ["train.max_steps=30", "run.dir=runs/x", "train.lr_g=1e-4", "model.sync_bn=true"])
    assert c.train.max_steps == 30 and c.run.dir == "runs/x" and c.model.gf_dim == 32
    assert c.train.lr_g == 1e-4 and c.model.sync_bn is True


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*train.max_steps"):
        load_config(None, ["train.max_step=3"])
    p = write(tmp_path, "train:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"train.batchsize.*train.batch_size"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown config key 'modle.gf_dim'.*model.gf_dim"):
        load_config(None, ["modle.gf_dim=3"])
    # nothing close: no unrelated suggestion, the sections instead
    with pytest.raises(ConfigError) as e:
        load_config(None, ["foo.bar=1"])
    assert "did you mean" not in str(e.value) and "sections: run, data, model, train" in str(e.value)


def test_wrong_type_and_choices():
    with pytest.raises(ConfigError, match="train.max_steps' expects int"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="train.precision' must be one of"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="train.batch_size' must be positive"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="train.color_coeff' needs model.stage=2"):
        load_config(None, ["model.stage=1", "train.color_coeff=10"])
    with pytest.raises(ConfigError, match="train.color_coeff' must be >= 0"):
        load_config(None, ["model.stage=2", "train.color_coeff=-1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2\n"))


def test_model_hash_tracks_shape_keys_only():
    a = load_config(None)
    assert a.model_hash() == load_config(None, ["train.max_steps=5", "log.every_steps=3"]).model_hash()
    assert a.model_hash() != load_config(None, ["model.gf_dim=64"]).model_hash()
