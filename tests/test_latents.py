"""The latent path on tiny data the test builds: an image folder, a tiny AutoencoderKL, shards
written by the CLI, training from them (lazily read, posterior draws), exact resume, bad shards."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from vrpo.cli import main  # noqa: E402
from vrpo.data import DataError  # noqa: E402
from vrpo.data.latents import LatentSet, LatentShards  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "fox"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(4):  # not square, not the resolution: the ADM crop decides
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    torch.manual_seed(0)
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16, **blocks
    )
    vae.save_pretrained(root / "vae")
    return root


def prepare(folder, out, *extra):
    return main(["prepare-latents", "--images", str(folder / "images"), "--out", str(out), "--vae",
                 str(folder / "vae"), "--resolution", "16", "--shard-size", "5", "--batch-size", "3",
                 *extra])  # fmt: skip


def test_prepare_writes_shards_that_resume_and_read_lazily(folder, tmp_path, capsys):
    out = tmp_path / "shards"
    assert prepare(folder, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 12 and manifest["classes"] == ["cat", "dog", "fox"]
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 2] and manifest["resolution"] == 16
    assert "12 images in 3 shards" in capsys.readouterr().out
    shards = LatentShards(out)
    rows = shards.rows(torch.tensor([11, 0, 6]))
    assert rows["mean"].shape == (3, 4, 8, 8) and rows["images"].shape == (3, 3, 16, 16)
    assert shards.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert (rows["std"] > 0).all()
    # a killed job: the finished shards stay, the missing one is written again, identically
    first = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").unlink()
    mtime = (out / "shard-00000.safetensors").stat().st_mtime_ns
    assert prepare(folder, out, "--workers", "2") == 0  # images read by 2 worker processes: the same shard
    assert (out / "shard-00001.safetensors").read_bytes() == first
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == mtime
    # the draws: scale * (mean + std * eps), eps from the generator
    data = LatentSet(out)
    x, images = data.batch_rows(torch.tensor([0, 1]), torch.Generator().manual_seed(1))
    eps = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    rows = shards.rows(torch.tensor([0, 1]))
    torch.testing.assert_close(x, data.scale * (rows["mean"] + rows["std"] * eps))
    assert images.dtype == torch.uint8 and data.resolution == 8 and data.channels == 4


def test_training_from_shards_resumes_exactly(folder, tmp_path, tiny_overrides):
    from safetensors.torch import load_file

    from vrpo.config import load_config
    from vrpo.runs.checkpoint import step_dirs
    from vrpo.train import train

    out = tmp_path / "shards"
    assert prepare(folder, out) == 0
    sets = [*tiny_overrides, "data.name=latents", f"data.root={out}", "data.limit=0", "data.resolution=8",
            "model.arch=SiT-T/2", "train.batch_size=4", "train.ckpt_every=2", "train.sample_grid=0"]  # fmt: skip
    train(load_config(None, [*sets, "train.max_steps=4"]), tmp_path / "straight")
    train(load_config(None, [*sets, "train.max_steps=2"]), tmp_path / "stopped")
    train(load_config(None, [*sets, "train.max_steps=4"]), tmp_path / "stopped")  # resumed at step 2
    a = load_file(str(step_dirs(tmp_path / "straight")[0] / "model.safetensors"))
    b = load_file(str(step_dirs(tmp_path / "stopped")[0] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # sampling decodes through the folder's VAE: pixels at the prepared resolution
    from vrpo.sample import sample_run

    samples = sample_run(tmp_path / "straight", 3, tmp_path / "s.npz", batch_size=2, progress=False)
    with np.load(samples) as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_0"].dtype == np.uint8


def test_the_whole_path_with_an_encoder_on_the_fly_and_a_score(folder, tmp_path, tiny_overrides, capsys):
    """Prepare, REPA on the latents with a tiny DINOv2 reading the stored images, sample, decode, score."""
    transformers = pytest.importorskip("transformers")
    from vrpo.config import load_config
    from vrpo.sample import sample_run
    from vrpo.train import train

    config = transformers.Dinov2Config(patch_size=14, image_size=28, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32)  # fmt: skip
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "dino")
    out = tmp_path / "shards"
    assert prepare(folder, out) == 0
    sets = [*tiny_overrides, "data.name=latents", f"data.root={out}", "data.limit=0", "data.resolution=8",
            "model.arch=SiT-T/2", "train.batch_size=4", "train.max_steps=2", "train.sample_grid=0",
            "objective.name=repa", f"objective.encoders=[hf:{tmp_path / 'dino'}]", "objective.encoder_input_size=28",
            "objective.feature_cache=null", "objective.projector_width=16"]  # fmt: skip
    result = train(load_config(None, sets), tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert result.step == 2  # the encoder ran on the stored images: loss = denoise + 0.5 (-cos), -cos != 0
    assert all(
        r["loss_align"] != 0 and r["loss"] == pytest.approx(r["loss_denoise"] + 0.5 * r["loss_align"]) for r in logged
    )
    samples = sample_run(tmp_path / "run", 4, tmp_path / "s.npz", batch_size=4, progress=False)
    capsys.readouterr()
    stored = LatentShards(out).rows(torch.arange(12))["images"]  # the reference: the crops at 16 px
    # shaped like ADM's VIRTUAL_imagenet256_labeled.npz: arr_0 and its TensorFlow statistics beside it
    tf_stats = dict(mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    np.savez(tmp_path / "ref.npz", arr_0=stored.permute(0, 2, 3, 1).numpy(), **tf_stats)
    ref = ["--ref", str(tmp_path / "ref.npz"), "--ref-num", "12", "--cache-dir", str(tmp_path / "refstats")]
    assert main(["eval", "--samples", str(samples), *ref, "--metrics", "fid", "--num", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] > 0


def test_a_corrupt_or_foreign_shard_is_named_in_one_line(folder, tmp_path, capsys):
    out = tmp_path / "shards"
    assert prepare(folder, out) == 0
    # a resume with other settings would mix two datasets: refused
    assert main(["prepare-latents", "--images", str(folder / "images"), "--out", str(out), "--vae",
                 str(folder / "vae"), "--resolution", "24", "--shard-size", "5"]) == 1  # fmt: skip
    assert "prepared with other settings (resolution differ)" in capsys.readouterr().err
    (out / "shard-00002.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="shard-00002.safetensors is missing, corrupt or foreign"):
        LatentShards(out)
    (out / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="is not a vrpo-latents-1 manifest"):
        LatentShards(out)


def test_a_latent_run_is_evaluated_decoded_and_its_targets_cached(folder, tmp_path, tiny_overrides, capsys):
    """Training evaluations decode through the VAE and score against the folder's stored crops; RA and
    the run's representation metrics read a second (held-out) latent folder; a feature cache built
    from the stored crops gives the loss the encoder on the fly gives; a wrong data.resolution is named."""
    from vrpo.config import load_config
    from vrpo.encoders.cache import FeatureCache, build_feature_caches
    from vrpo.objectives import build_objective
    from vrpo.train import train
    from vrpo.train.loop import make_batch

    out, held_out = tmp_path / "shards", tmp_path / "held-out"
    assert prepare(folder, out) == 0 and prepare(folder, held_out, "--shard-size", "4") == 0
    sets = [*tiny_overrides, "data.name=latents", f"data.root={out}", "data.limit=0", "data.resolution=8",
            "model.arch=SiT-T/2", "train.batch_size=4", "train.max_steps=2", "train.sample_grid=0",
            "objective.name=repa", "objective.encoders=[efficientnet-lite0]", "objective.encoder_input_size=32",
            "objective.feature_cache=null", "objective.projector_width=16", "eval.every=2", "eval.num_samples=6",
            "eval.ref_num=12", f"eval.cache_dir={tmp_path / 'refstats'}", "eval.ra_num=5",
            f"eval.held_out={held_out}"]  # fmt: skip
    train(load_config(None, sets), tmp_path / "run")
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["fid"] > 0 and -1 <= record["ra"] <= 1
    # the folder's reference statistics are cached under its manifest and rows: a second score reads no crop
    from vrpo.eval.sample_metrics import evaluate_samples

    samples = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    scored = lambda: evaluate_samples(samples, out, ["fid"], ref_num=12, cache_dir=tmp_path / "refstats")  # noqa: E731
    first = scored()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LatentSet, "pixels", lambda *_: pytest.fail("the reference's crops were read again"))
        assert scored()["fid"] == first["fid"]
    assert main(["eval", "--run", str(tmp_path / "run"), "--metrics", "ra,cknna,probe", "--num", "12",
                 "--timesteps", "0.5"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["dataset"] == "latents" and result["split"] == "held-out" and result["num"] == 12
    assert -1 <= result["ra"] <= 1 and 0 <= result["probe"] <= 1 and result["cknna"] is not None
    # the targets cached from the stored crops, read lazily: the same loss as encoding on the fly
    cfg = load_config(None, [*sets, f"objective.feature_cache={tmp_path / 'features'}"])
    data = LatentSet(out)
    objective = build_objective(load_config(None, sets), (model := _model(cfg, data)), data)
    build_feature_caches(objective.alignment.encoders, tmp_path / "features", lambda: data, progress=False)
    cached = build_objective(cfg, model, data)
    cached.load_state_dict(objective.state_dict())
    assert isinstance(cached.alignment.caches[0], FeatureCache)
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(data, torch.tensor([0, 5, 11]), "cpu", True, gen)
    on_the_fly = objective.loss(model, batch, torch.Generator().manual_seed(1)).loss
    from_cache = cached.loss(model, batch, torch.Generator().manual_seed(1)).loss
    torch.testing.assert_close(on_the_fly, from_cache, rtol=1e-3, atol=1e-3)  # fp16 cache
    with pytest.raises(DataError, match="latents are 8 px but data.resolution is 16"):
        train(load_config(None, [*sets, "data.resolution=16"]), tmp_path / "wrong")


def _model(cfg, data):
    from vrpo.models import build_model

    torch.manual_seed(0)
    return build_model(cfg.model.arch, data.resolution, data.channels, data.num_classes)
