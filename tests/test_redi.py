"""ReDi: the image and the first K principal components of the encoder's patch features are
generated together as channels; the PCA reconstructs its training features to its explained
variance; dropped samples get no component loss; representation guidance at sampling."""

import pytest
import torch

from test_models import randomize
from test_objective_contract import build, config, loss_and_grads
from vrpo.data import load_split, step_generator
from vrpo.errors import ConfigError
from vrpo.models import build_model
from vrpo.objectives import Batch, build_objective
from vrpo.transport import generate

pytest.importorskip("efficientnet_lite_pytorch")


def fitted_features(redi, batch):
    z = (redi.alignment.encoder_outputs(batch)[0][0].flatten(0, 1).double() - redi.feature_mean) / redi.feature_std
    return z - z.mean(0)


def test_the_pca_reconstructs_its_training_features_to_its_explained_variance():
    _, model, redi, batch = build("redi", "flow")  # fitted on the 40 training images the helper loads
    digits = load_split("digits", "train")
    digits.images, digits.labels = digits.images[:40], digits.labels[:40]
    z = fitted_features(redi, Batch(torch.zeros(40), None, digits.images, torch.arange(40)))
    basis = redi.basis.double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)
    reconstructed = (z @ basis.T) @ basis
    kept = 1.0 - (z - reconstructed).pow(2).sum() / z.pow(2).sum()
    assert float(kept) == pytest.approx(float(redi.explained), abs=1e-5)
    assert 0.0 < float(redi.explained) < 1.0
    more = build_objective(config("redi", "flow", "objective.components=16"), model, digits)
    assert float(more.explained) > float(redi.explained)
    torch.testing.assert_close(more.basis[:8].double(), basis, atol=1e-4, rtol=0)  # nested, signs fixed
    # the component maps: the encoder's grid projected and resized to the 32 x 32 image
    maps = redi.components_of(redi.alignment.encoder_outputs(batch)[0][0])
    assert maps.shape == (8, 8, 32, 32)


def test_loss_is_the_images_plus_the_weighted_components_and_dropout_removes_theirs():
    cfg, model, redi, batch = build("redi", "flow")
    out, grads = loss_and_grads(model, redi, batch, step_generator(0, 0))
    step, _ = redi.noised_pass(model, batch, step_generator(0, 0))
    expected = step.parts["denoise"].mean() + 1.0 * step.parts["representation"].mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert model.in_channels == 9 and step.prediction.shape[1] == 9
    assert all(g is None for n, g in grads.items() if n.startswith("objective.alignment.projectors"))
    dropping = build_objective(config("redi", "flow", "objective.representation_dropout=0.5"), model)
    dropping.load_state_dict(redi.state_dict())
    dropped, _ = dropping.noised_pass(model, batch, step_generator(0, 0))
    zero = dropped.parts["representation"] == 0
    assert 0 < int(zero.sum()) < 8  # some samples dropped, keyed on the step's generator
    torch.testing.assert_close(dropped.t, step.t, rtol=0, atol=0)  # the standard draws are unchanged
    torch.testing.assert_close(dropped.noise, step.noise, rtol=0, atol=0)
    x0 = dropped.x_t[:, 1:] - dropped.t.view(-1, 1, 1, 1) * dropped.noise[:, 1:]  # the clean components
    assert x0[zero].abs().max() < 1e-5 and x0[~zero].abs().max() > 0.1


def test_config_sets_the_channels_and_refuses_what_cannot_work():
    assert config("redi", "flow").model.representation_channels == 8
    with pytest.raises(ConfigError, match="must be 8, got 4"):
        config("redi", "flow", "model.representation_channels=4")
    with pytest.raises(ConfigError, match="does not feed it"):
        config("repa", "flow", "model.representation_channels=8")
    with pytest.raises(ConfigError, match="representation_guidance"):
        config("repa", "flow", "sampler.representation_guidance=1.5")


def test_sampling_generates_both_and_representation_guidance_zeroes_the_components():
    model = randomize(build_model("SiT-T/8", 32, 1, 10, representation_channels=3)).eval()
    cfg = config("redi", "flow", "objective.components=3", "sampler.method=euler", "sampler.steps=2",
                 "sampler.representation_guidance=1.5")  # fmt: skip
    y, noise = torch.tensor([1, 2]), torch.randn(2, 4, 32, 32)
    sampled = generate(model, cfg, y, noise, torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 1, 32, 32)  # the image's channel alone comes out
    x = noise
    for t, t_next in ((1.0, 0.5), (0.5, 0.0)):
        net_t = torch.full((2,), t) * 1000
        absent = x.clone()
        absent[:, 1:] = 0
        with_them, without = model(x, net_t, y).prediction, model(absent, net_t, y).prediction
        v = torch.cat([without[:, :1] + 1.5 * (with_them[:, :1] - without[:, :1]), with_them[:, 1:]], 1)
        x = x + (t_next - t) * v
    torch.testing.assert_close(sampled, x[:, :1], atol=1e-5, rtol=1e-5)
