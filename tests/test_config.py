import pytest

from vrpo.config import ConfigError, load_config, parse_override

SIT = "configs/fmnist/sit-t2.yaml"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def test_overrides_and_types():
    cfg = load_config(SIT, ["train.max_steps=40", "optim.lr=1e-3", "sampler.cfg_interval=[0.1, 0.7]"])
    assert cfg.train.max_steps == 40 and cfg.optim.lr == 1e-3 and cfg.sampler.cfg_interval == [0.1, 0.7]
    assert isinstance(load_config(SIT, ["optim.lr=1"]).optim.lr, float)  # int accepted as float


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batchsize=3", "unknown config key 'train.batchsize' (did you mean 'train.batch_size'?)"),
        ("trian.max_steps=3", "unknown config section 'trian' (did you mean 'train'?)"),
        ("train.max_steps=abc", "config key 'train.max_steps' expects int, got 'abc'"),
        ("train.progress=3", "config key 'train.progress' expects bool"),
        ("objective.name=repo", "unknown objective 'repo'"),
        ("objective.name=ddpm", "does not train the flow family of model.arch SiT-T/2"),
        ("sampler.method=ddpm", "does not fit the flow family of model.arch SiT-T/2"),
        ("data.resolution=33", "not divisible by the patch size"),
        ("train.grad_accum=3", "not divisible by train.grad_accum"),
        ("transport.prediction=noise", "sampler.t_start below 1"),
    ],
)
def test_errors_are_one_line_and_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(SIT, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unconditional_guidance_is_impossible():
    with pytest.raises(ConfigError, match="needs labels"):
        load_config(SIT, ["data.unconditional=true", "sampler.cfg_scale=2.0"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.max_steps")


def test_every_shipped_config_loads(request):
    from pathlib import Path

    configs = sorted(Path(request.config.rootpath, "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        if "study" not in path.parts:
            load_config(path)


def test_config_extends_another(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {SIT}\nobjective:\n  name: sit\ntrain:\n  max_steps: 7\n")
    parent, cfg = load_config(SIT), load_config(child, ["optim.lr=2e-3"])
    # sections merge key by key: the child's train.max_steps, the parent's batch size and model
    assert cfg.train.max_steps == 7 and cfg.train.batch_size == parent.train.batch_size
    assert cfg.model.arch == parent.model.arch and cfg.optim.lr == 2e-3
    relative = tmp_path / "sub" / "relative.yaml"  # a parent path relative to the file's folder
    relative.parent.mkdir()
    relative.write_text("extends: ../child.yaml\ntrain:\n  batch_size: 8\n")
    assert (load_config(relative).train.max_steps, load_config(relative).train.batch_size) == (7, 8)
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(loop)
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml not found \\(extended by"):
        load_config(orphan)


def test_ablation_presets_differ_from_vrpo_t2_in_one_choice():
    base = load_config("configs/fmnist/vrpo-t2.yaml").to_dict()
    fixed = load_config("configs/fmnist/ablations/weights-fixed.yaml").to_dict()
    changed = {k for k in base["objective"] if base["objective"][k] != fixed["objective"][k]}
    assert changed == {"weighting"} and {k: base[k] for k in base if k != "objective"} == {
        k: fixed[k] for k in fixed if k != "objective"
    }
