"""Config loading: merging, overrides, and one clear sentence for every bad input."""

import pytest

import zoo
from zoo.config import ConfigError, load_config, validate_model


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_sources_merge_in_order_and_overrides_apply(tmp_path):
    a = write(tmp_path, "model: {d_model: 32, mixers: {attention: {n_heads: 4}}}\ntrain: {lr: 0.1}\n", "a.yaml")
    b = write(tmp_path, "train: {steps: 7}\n", "b.yaml")
    run = load_config([a, b], overrides=["train.lr=1e-3", "model.n_layers=3", "task.seq_len=32"])
    assert run.model.d_model == 32 and run.model.n_layers == 3
    assert run.train.lr == pytest.approx(1e-3) and run.train.steps == 7 and run.task.seq_len == 32
    assert isinstance(zoo.build_model(run), zoo.ZooForCausalLM)


def test_pattern_repeats_to_n_layers_and_mixers_supply_kwargs():
    cfg = validate_model({"d_model": 32, "n_layers": 5, "pattern": ["attention", "attention"],
                          "mixers": {"attention": {"n_heads": 2}}, "mlp": "gelu"})
    assert len(cfg.layers) == 5 and all(s["kwargs"] == {"n_heads": 2} and s["mlp"] == "gelu" for s in cfg.layers)


def test_explicit_layers_override_per_layer():
    cfg = validate_model({"d_model": 32, "layers": [{"mixer": "attention", "n_heads": 8, "mlp": "none"},
                                                   {"mixer": "attention", "window": 4}],
                          "mixers": {"attention": {"n_heads": 4}}})
    assert cfg.n_layers == 2
    assert cfg.layers[0] == {"mixer": "attention", "mlp": "none", "kwargs": {"n_heads": 8}}
    assert cfg.layers[1]["kwargs"] == {"n_heads": 4, "window": 4}


def test_bare_config_name_resolves_to_the_repo_configs():
    assert load_config("attention").model.mixer_names == ["attention", "attention"]


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ({"model": {"d_modle": 32}}, r"model\.d_modle: unknown key\. Did you mean 'd_model'\?"),
        ({"modle": {}}, r"modle: unknown top-level section\. Did you mean 'model'\?"),
        ({"model": {"d_model": "wide"}}, r"model\.d_model: expected int"),
        ({"model": {"pattern": ["mamab"]}}, r"model\.pattern\[0\]: unknown mixer 'mamab'.*Registered mixers: .*attention"),
        ({"model": {"d_model": 30, "mixers": {"attention": {"n_heads": 4}}}}, r"model\.layers\[0\] \(attention\): .*must divide d_model=30"),
        ({"model": {"mixers": {"attention": {"n_head": 4}}}}, r"model\.mixers\.attention\.n_head: unknown option.*'n_heads'"),
        ({"model": {"mixers": {"attention": {"window": "big"}}}}, r"model\.mixers\.attention\.window: expected int or null"),
        ({"model": {"mlp": "swiglue"}}, r"model\.mlp: 'swiglue' is not an MLP kind"),
        ({"model": {"layers": [{"n_heads": 4}]}}, r"model\.layers\[0\]: each layer needs a 'mixer' name"),
        ({"train": {"lrr": 1}}, r"train\.lrr: unknown key\. Did you mean 'lr'\?"),
        ({"task": {"name": "mqr"}}, r"task\.name: 'mqr' is not allowed; choose one of .*Did you mean 'mqar'\?"),
        ({"model": {"n_layers": 0}}, r"model\.n_layers: must be a positive integer"),
    ],
)
def test_bad_input_gets_one_clear_sentence(source, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(source)
    assert "\n" not in str(err.value)


def test_missing_file_and_yaml_syntax_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml' not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "model:\n  d_model: [32\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: YAML syntax error at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config({}, overrides=["train.lr"])


def test_floats_written_without_a_dot_are_accepted():
    # PyYAML reads 1e-3 as a string; a float field takes it.
    assert load_config({"train": {"lr": "1e-3"}}).train.lr == pytest.approx(1e-3)


def test_model_keys_are_read_from_zooconfig():
    """One declaration: every ZooConfig field is a model key (use_cache was missing from a hand-kept copy)."""
    from zoo.config import model_keys
    from zoo.models.configuration import ZooConfig

    own = {k for k in ZooConfig.__dict__["__annotations__"] if not k.startswith("_")}
    assert own and own <= set(model_keys())
    run = zoo.load_config({"model": {"d_model": 32, "use_cache": False, "pattern": ["attention"],
                                     "mixers": {"attention": {"n_heads": 4}}}})
    assert run.model.use_cache is False
    with pytest.raises(zoo.ConfigError, match="model.pooling"):
        zoo.load_config({"model": {"d_model": 32, "pooling": "max", "pattern": ["attention"],
                                   "mixers": {"attention": {"n_heads": 4}}}})


def test_each_layer_is_built_once_to_check_and_once_for_real(monkeypatch):
    """One meta-device build validates the config (shapes and size); build_model then builds the model once."""
    import zoo.models.modeling as modeling
    import zoo.registry as registry

    calls = []
    real = registry.build_mixer

    def counting(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(registry, "build_mixer", counting)
    monkeypatch.setattr(modeling, "build_mixer", counting)
    run = load_config({"model": {"d_model": 32, "n_layers": 3, "pattern": ["attention"],
                                 "mixers": {"attention": {"n_heads": 4}}}})
    assert len(calls) == 3
    zoo.build_model(run)
    assert len(calls) == 6


def test_layer_kwargs_are_normalised_once_and_type_checked():
    cfg = validate_model({"d_model": 32, "layers": ["attention", {"mixer": "attention", "n_heads": 2, "mlp": "gelu"}],
                          "mixers": {"attention": {"n_heads": 4}}})
    assert [s["kwargs"]["n_heads"] for s in cfg.layers] == [4, 2] and [s["mlp"] for s in cfg.layers] == ["swiglu", "gelu"]
    with pytest.raises(ConfigError, match=r"model\.layers\[1\]\.mlp: 'gelo' is not an MLP kind"):
        validate_model({"d_model": 32, "layers": ["attention", {"mixer": "attention", "mlp": "gelo"}]})
    with pytest.raises(ConfigError, match=r"model\.layers\[1\]\.n_heads: expected int"):
        validate_model({"d_model": 32, "layers": ["attention", {"mixer": "attention", "n_heads": "four"}]})
    with pytest.raises(ConfigError, match=r"model\.layers\[1\]: each layer needs a 'mixer' name"):
        validate_model({"d_model": 32, "layers": ["attention", 7]})
