"""Token grids of a dataset, computed once per VQ-VAE, and per-image token masks on disk.

The Transformer stage and every ILTM iteration train on the same token grids; quantising the training set again for
each would cost a full encoder pass per iteration. The cache is keyed by the VQ-VAE's weights and the image list, so
a retrained VQ-VAE or another datalist never reuses stale tokens.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence

import torch
from monai.data import DataLoader, Dataset
from torch import nn
from tqdm import tqdm

from scripts.checkpoint import CheckpointError, load_checkpoint
from scripts.files import atomic_save
from scripts.vqvae import eval_except

logger = logging.getLogger(__name__)


def latent_shape(vqvae: nn.Module, in_channels: int, image_size: Sequence[int]) -> tuple[int, ...]:
    """The token grid the VQ-VAE gives for the configured image size (shapes come from the model)."""
    with torch.no_grad(), eval_except(vqvae):
        probe = torch.zeros(1, in_channels, *image_size, device=next(vqvae.parameters()).device)
        return tuple(vqvae.index_quantize(probe).shape[1:])


def _fingerprint(vqvae: nn.Module, files: Sequence[dict]) -> str:
    digest = hashlib.sha1()
    for name, tensor in sorted(vqvae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for entry in files:
        digest.update(str(entry["image"]).encode())
    return digest.hexdigest()


@torch.no_grad()
def quantise(
    vqvae: nn.Module, files: Sequence[dict], transform: Callable, device: torch.device, batch_size: int = 16, desc=""
) -> torch.Tensor:
    """[N, *grid] code indices of every entry, with the VQ-VAE in eval mode (no dropout, no EMA update)."""
    loader = DataLoader(Dataset(list(files), transform), batch_size=batch_size, shuffle=False)
    with eval_except(vqvae):
        grids = [vqvae.index_quantize(b["image"].to(device)).cpu() for b in tqdm(loader, desc=desc, leave=False)]
    return torch.cat(grids)


def cached_tokens(
    vqvae: nn.Module, files: Sequence[dict], transform: Callable, device: torch.device, path: str, desc: str = ""
) -> torch.Tensor:
    """`quantise`, stored at `path` and reused while the VQ-VAE weights and the image list are unchanged."""
    key = _fingerprint(vqvae, files)
    if os.path.isfile(path):
        try:
            cached = load_checkpoint(path)
        except CheckpointError as e:  # a cache: computed again rather than trusted
            logger.warning(f"{e}; quantising again")
            cached = {}
        if cached.get("key") == key:
            return cached["tokens"]
        logger.info(f"{path}: VQ-VAE or image list changed, quantising again")
    tokens = quantise(vqvae, files, transform, device, desc=desc or f"quantising {len(files)} images")
    atomic_save({"key": key, "tokens": tokens, "images": [str(e["image"]) for e in files]}, path)
    return tokens


def save_token_masks(path: str, files: Sequence[dict], suspect: torch.Tensor) -> None:
    """Token masks [N, *grid] (True = suspect, masked in training), keyed by image path so order cannot mix them."""
    if len(files) != len(suspect):
        raise ValueError(f"{len(files)} images but {len(suspect)} token masks")
    atomic_save({str(e["image"]): m.bool().cpu() for e, m in zip(files, suspect)}, path)


def load_token_masks(path: str, files: Sequence[dict], grid: Sequence[int], required: bool = False) -> torch.Tensor:
    """[N, *grid] suspect masks for `files` from a file written by `save_token_masks`; unlisted images: none.

    ``required``: masks a user gave (``iltm#initial_masks``). A file listing none of `files` is refused (written for
    another dataset folder, it would silently train every image unmasked); one listing only some gets a warning.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: token mask file not found")
    stored = load_checkpoint(path)
    suspect = torch.zeros((len(files), *grid), dtype=torch.bool)
    listed = 0
    for i, entry in enumerate(files):
        mask = stored.get(str(entry["image"]))
        if mask is not None:
            if tuple(mask.shape) != tuple(grid):
                raise ValueError(f"{path}: mask of {entry['image']} has shape {tuple(mask.shape)}, latent grid {grid}")
            suspect[i] = mask
            listed += 1
    if required and files and not listed:
        raise ValueError(f"{path}: token masks of none of the {len(files)} training images (keyed by image path, "
                         f"e.g. {files[0]['image']}); masks of another dataset?")  # fmt: skip
    if required and listed < len(files):
        logger.warning(f"{path}: no token masks for {len(files) - listed} of the training images; none of their tokens "
                       "is masked by this file")  # fmt: skip
    return suspect


def mask_spec(spec: str) -> tuple[str, str]:
    """``iltm#initial_masks`` -> (labels part: "", "labels", "labels&" or "labels|"; mask file path or "")."""
    if spec == "labels":
        return "labels", ""
    for labels in ("labels&", "labels|"):
        if spec.startswith(labels):
            return labels, spec[len(labels) :]
    return "", spec
