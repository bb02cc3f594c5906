"""This project's REPA step against the official REPA code's step, interleaved in one process; prints JSON.

The official code (github sihyun-yu/REPA) is read from ``--official DIR``, a checkout holding its
``models/sit.py`` and ``loss.py`` (e.g. ``git --git-dir MIRROR archive HEAD models loss.py | tar -x
-C DIR``); nothing of it is copied here. Its only outside imports are timm's PatchEmbed, Attention
and Mlp, given here as a small stand-in module with timm's semantics (fused attention on).

Both sides train the same network (SiT-T/4 on 32 x 32 x 1, REPA at block 2, projector width 512,
1280-d targets on the 8 x 8 grid, AdamW, grad clip 1, EMA) on the same batch size. The official
step gets its targets as a ready tensor; this project's step reads them from the feature cache
(``configs/fmnist/repa-t4.yaml``: build it with ``vrpo cache-features``) and pays for it. Steps
alternate (official, ours, ours with ``--variant`` settings, ...); each variant's median step time
is reported with the median of the per-round ratios official / ours and its bootstrap 95 % interval.

    python benchmarks/official_repa_step.py --official /tmp/repa --steps 30 \\
        --variant compiled=train.compile=true
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from alignment_overhead import paired_ratio  # noqa: E402


def timm_stand_in() -> types.ModuleType:
    """``timm.models.vision_transformer`` with the three classes the official SiT imports."""

    class PatchEmbed(nn.Module):
        def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
            super().__init__()
            self.num_patches, self.patch_size = (img_size // patch_size) ** 2, (patch_size, patch_size)
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class Attention(nn.Module):
        def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, **_):
            super().__init__()
            self.num_heads, self.fused_attn = num_heads, True
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.q_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
            self.k_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
            return self.proj(out.transpose(1, 2).reshape(b, n, c))

    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0, **_):
            super().__init__()
            self.fc1, self.act, self.fc2 = (
                nn.Linear(in_features, hidden_features),
                act_layer(),
                nn.Linear(hidden_features, in_features),
            )

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    module = types.ModuleType("timm.models.vision_transformer")
    module.PatchEmbed, module.Attention, module.Mlp = PatchEmbed, Attention, Mlp
    return module


def official_step(official: Path, batch: int, seed: int):
    """A closure running one official training step (loss, backward, clip, AdamW, EMA)."""
    stand_in = timm_stand_in()
    for name in ("timm", "timm.models"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["timm.models.vision_transformer"] = stand_in
    sys.path.insert(0, str(official))
    from loss import SILoss  # the official code
    from models.sit import SiT

    torch.manual_seed(seed)
    model = SiT(path_type="linear", input_size=32, patch_size=4, in_channels=1, hidden_size=192,
                decoder_hidden_size=192, encoder_depth=2, depth=6, num_heads=3, num_classes=10, use_cfg=True,
                z_dims=[1280], projector_dim=512, fused_attn=True, qk_norm=False)  # fmt: skip
    ema = SiT(path_type="linear", input_size=32, patch_size=4, in_channels=1, hidden_size=192,
              decoder_hidden_size=192, encoder_depth=2, depth=6, num_heads=3, num_classes=10, use_cfg=True,
              z_dims=[1280], projector_dim=512, fused_attn=True, qk_norm=False)  # fmt: skip
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    loss_fn = SILoss(prediction="v", path_type="linear", weighting="uniform")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 1, 32, 32), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    zs = [torch.randn((batch, 64, 1280), generator=g)]

    def step():
        loss, proj_loss = loss_fn(model, x, dict(y=y), zs=zs)
        total = loss.mean() + 0.5 * proj_loss.mean()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(0.9999).add_(p.data, alpha=1e-4)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="checkout of sihyun-yu/REPA")
    parser.add_argument("--config", default="configs/fmnist/repa-t4.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                        help="another setting of this project's step, e.g. compiled=train.compile=true")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from vrpo.config import load_config
    from vrpo.train.loop import Trainer

    total = args.steps + args.warmup + 1
    base = ["optim.lr=1e-3", "optim.warmup_steps=0", f"train.batch_size={args.batch}", "train.progress=false",
            "train.tensorboard=false", "optim.grad_clip=1.0", f"train.max_steps={total}"]  # fmt: skip
    variants = {"ours": []}
    for text in args.variant:
        name, _, sets = text.partition("=")
        variants[name] = sets.split(",")
    steps = {"official": official_step(args.official, args.batch, 0)}
    with tempfile.TemporaryDirectory() as root:
        for i, (name, sets) in enumerate(variants.items()):
            trainer = Trainer(load_config(args.config, [*base, *sets]), f"{root}/{i}")
            steps[name] = trainer.train_one_step
        times = {name: [] for name in steps}
        for round_ in range(args.warmup + args.steps):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    result = {"config": args.config, "batch": args.batch, "threads": torch.get_num_threads(), "steps": args.steps,
              "official_ms": round(1000 * statistics.median(times["official"]), 1), "variants": {}}  # fmt: skip
    for name in variants:  # official / ours per round: > 1 when ours is faster
        speedup = paired_ratio(times["official"], times[name])
        ms = round(1000 * statistics.median(times[name]), 1)
        result["variants"][name] = {"sets": variants[name], "ms": ms, "speedup_over_official": speedup["median"],
                                    "interval_95": speedup["ci95"]}  # fmt: skip
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
