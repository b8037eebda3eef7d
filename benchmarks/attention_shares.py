"""Where a model's cross-attention inside the true edit region goes, by token role: the measurement
behind "does LIME's regularization matter on this model" (issue 18; docs/quality.md).

    python benchmarks/attention_shares.py                         # the shipped shapes-ip2p
    python benchmarks/attention_shares.py --model A --model B     # several models, one table

For ``--n`` held-out edits (seeds from 6,100,000: neither training's nor the quality benchmark's) and
each timestep in ``--t``, the UNet sees what the sampler holds when an edit goes right: the target's
latents noised to t beside the source's latents, and the instruction's embeddings (the text branch).
At LIME's regularized levels (``--levels``, default 0 and 1: the two finest latent grids) each
cross-attention layer's head-averaged probabilities are averaged over the pixels of the true region
(downsampled to the layer's grid by area) and split by the role of the key position
(``lime_fast.tokens``):

  BOS         position 0 (CLIP's causal mask: the same output for every prompt, a possible sink;
              silenced inside the RoI)
  content     the content words: what localization reads and what the regularization keeps
  other kept  the other words the regularization keeps (verbs, adjectives that are not content...)
  stop        stop words: what the regularization silences inside the RoI
  EOS         the first EOS (kept; after the causal encoder it summarizes the whole instruction)
  padding     the positions after it (silenced; CLIP pads with EOS, so they carry the prompt too)

Rows are means over layers, timesteps and edits, and sum to 1. The more of the region's attention the
silenced roles hold, and the less of the instruction they carry, the more LIME's penalty changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

FIRST_SEED = 6_100_000
ROLES = ("BOS", "content", "other kept", "stop", "EOS", "padding")


def _train_shapes():
    """scripts/train_shapes.py as a module (a script beside the package, loaded by its path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_shapes", ROOT / "scripts" / "train_shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_shapes", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def role_index(tokenizer, instruction: str) -> np.ndarray:
    """[T] index into ROLES for each of the padded positions of ``instruction``."""
    from lime_fast.tokens import token_roles

    r = token_roles(tokenizer, instruction)
    T, eos = len(r.keep), len(r.input_ids) - 1
    idx = np.full(T, ROLES.index("padding"))
    idx[0] = ROLES.index("BOS")
    for i in range(1, eos):
        idx[i] = ROLES.index("other kept") if r.keep[i] else ROLES.index("stop")
    idx[eos] = ROLES.index("EOS")
    idx[r.content] = ROLES.index("content")
    return idx


@torch.no_grad()
def shares(model, n: int = 32, timesteps=(300, 700), levels=(0, 1), first_seed: int = FIRST_SEED,
           batch: int = 16) -> dict:
    """Mean share of the true region's cross-attention per token role -> {role: share} (sums to 1)."""
    from lime_fast.clip_bpe import clip_tokenizer
    from lime_fast.testing.shapes import make_batch
    train = _train_shapes()
    SIZE, install_grounding, load_models, training_alphas_cumprod = (
        train.SIZE, train.install_grounding, train.load_models, train.training_alphas_cumprod)

    vae, unet, text_encoder = load_models(model)
    tok = clip_tokenizer()
    state = {"maps": []}
    install_grounding(unet, state)
    acp = training_alphas_cumprod()
    sf = vae.config.scaling_factor
    gen = torch.Generator().manual_seed(0)
    total, count = np.zeros(len(ROLES)), 0
    for start in range(first_seed, first_seed + n, batch):
        b = make_batch(range(start, min(start + batch, first_seed + n)), SIZE)
        B = len(b["instruction"])
        ids = tok(b["instruction"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        roles = torch.as_tensor(np.stack([role_index(tok, s) for s in b["instruction"]]))  # [B, T]
        onehot = F.one_hot(roles, len(ROLES)).float()  # [B, T, R]
        post = vae.encode(torch.cat([b["target"], b["source"]])).latent_dist
        z0, z_src = post.mode()[:B] * sf, post.mode()[B:]
        emb = text_encoder(ids)[0]
        h = z0.shape[-1]
        grids = {(h >> lvl) ** 2: h >> lvl for lvl in levels}
        for t in timesteps:
            ac = acp[t]
            zt = ac.sqrt() * z0 + (1 - ac).sqrt() * torch.randn(z0.shape, generator=gen)
            state.update(maps=[], pad_drop=torch.zeros(B, dtype=torch.bool), keep=ids >= 0, all=torch.arange(B))
            unet(torch.cat([zt, z_src], 1), torch.full((B,), t), encoder_hidden_states=emb)
            for probs in state["maps"]:  # [B, N, T] head-averaged
                g = grids.get(probs.shape[1])
                if g is None:
                    continue
                w = F.adaptive_avg_pool2d(b["mask"][:, None].float(), g).flatten(1)  # [B, N] share of each cell inside
                inside = (w[:, :, None] * probs).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-8)  # [B, T]
                total += torch.einsum("bt,btr->r", inside, onehot).numpy()
                count += B
    return dict(zip(ROLES, total / count))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None, help="diffusers folder (repeatable; default: shapes-ip2p)")
    ap.add_argument("--n", type=int, default=32, help="held-out edits (default 32)")
    ap.add_argument("--t", type=int, nargs="+", default=[300, 700], help="timesteps (default 300 700)")
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 1], help="latent levels (default 0 1)")
    args = ap.parse_args(argv)
    from lime_fast.demo import shapes_model

    models = args.model or [str(shapes_model())]
    print(f"Cross-attention inside the true region, levels {args.levels}, text branch, {args.n} edits "
          f"(seeds {FIRST_SEED:,}-{FIRST_SEED + args.n - 1:,}), t = {', '.join(map(str, args.t))}; share per token role:\n")
    print("| model | " + " | ".join(ROLES) + " |")
    print("|---|" + "---|" * len(ROLES))
    for m in models:
        s = shares(m, args.n, tuple(args.t), tuple(args.levels))
        print(f"| {m} | " + " | ".join(f"{s[r]:.3f}" for r in ROLES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
