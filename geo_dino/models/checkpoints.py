"""Checkpoint layouts: recognise a state dict by its keys and shapes, never by its file name.

Four layouts are read, each converted to timm's names (the modules the pipeline builds):

* ``timm``     — timm's own names (``reg_token``, ``blocks.N.gamma_1``, ``attn.q_bias`` …).
* ``official`` — Meta's DINO / DINOv2 / DINOv3 repositories (``storage_tokens``, ``blocks.N.ls1.gamma``,
  ``rope_embed.periods``, ``register_tokens``, ``mlp.w12`` …); converted by timm's own checkpoint filters.
* ``hf``       — Hugging Face transformers (``embeddings.cls_token``, ``layer.N.attention.q_proj`` …, as in
  ``DINOv3ViTModel``); converted here.
* ``torchgeo`` — torchgeo's published multispectral ViTs (``ViTSmall16_Weights.SENTINEL2_ALL_DINO`` …): a
  bare state dict of timm's plain ViT (learned positions, no registers, no layer scale) whose patch embedding
  takes other than 3 bands, saved with ``torch.save``. timm's names already; a classifier ``head.*``, which
  torchgeo's own loader ignores and a backbone has no place for, is dropped.

:func:`inspect_state` tells the layout and the architecture (family, width, depth, patch size, input bands,
registers, MLP type, q/v biases) from the tensors; :func:`to_timm` converts. Strictness (missing, unexpected
and misshaped keys) is checked by the loader against the model it builds. :func:`identify_published` tells
which registered published file a local file is, by its sha256.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from geo_dino.errors import CheckpointError
from geo_dino.files import sha256_file


@dataclass(frozen=True)
class Detected:
    """What the tensors say about a checkpoint."""

    layout: str  # timm | official | hf | torchgeo
    family: str  # dino (a plain ViT: learned positions, no layer scale, no registers) | dinov2 | dinov3
    embed_dim: int
    depth: int
    patch_size: int
    n_registers: int
    mlp: str  # mlp | swiglu
    qkv_bias: bool  # q and v biases present (DINOv3 "qkvb" variants)
    n_params: int
    pos_grid: int | None = None  # side of the learned position-embedding grid (DINO, DINOv2), None with RoPE
    in_chans: int | None = None  # input bands of the patch embedding

    def matches(self, arch: Any, in_chans: int | None = None) -> list[str]:
        """Differences between this checkpoint and a registry :class:`~geo_dino.models.archs.ArchSpec`
        (empty: fits). ``in_chans``: the bands the checkpoint declares in its metadata (geo_dino's own
        exports of adapted models), else the architecture's."""
        diffs = []
        # a MoCo v3 ViT's tensors are a plain ViT's, as DINO's: only the registry tells them apart
        family = "dino" if arch.family == "moco" else arch.family
        bands = in_chans or arch.in_chans
        for name, mine, theirs in (("family", self.family, family),
                                   ("embed_dim", self.embed_dim, arch.embed_dim),
                                   ("depth", self.depth, arch.depth),
                                   ("patch_size", self.patch_size, arch.patch_size),
                                   ("registers", self.n_registers, arch.n_registers),
                                   ("mlp", self.mlp, arch.mlp),
                                   ("in_chans", self.in_chans or bands, bands)):
            if mine != theirs and not (name == "family" and theirs == "test"):
                diffs.append(f"{name} {mine} (checkpoint) vs {theirs} ({arch.name})")
        return diffs


_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    """Drop wrapper prefixes (DDP ``module.``, ``backbone.``) and pick the teacher/model from a training dict.

    DINOv2's official training code may chunk the blocks (``block_chunks``, used for ViT-g under FSDP): keys
    ``blocks.<chunk>.<i>.`` where ``i`` is already the global block index (earlier chunks hold Identity
    placeholders); they are flattened to ``blocks.<i>.``."""
    for key in ("teacher", "model_ema", "model", "state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    out = {}
    for k, v in state.items():
        for p in ("module.", "backbone.", "_orig_mod."):
            k = k.removeprefix(p)
        k = _CHUNKED.sub(r"blocks.\1.", k)
        out[k] = v
    return out


_HF_LAYER = re.compile(r"^(?:model\.|encoder\.)?layer\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def detect_layout(state: dict[str, Any]) -> str:
    """The key layout of a state dict: ``"timm"``, ``"official"`` (DINO/DINOv2/DINOv3 repositories), ``"hf"``
    (Hugging Face transformers) or ``"torchgeo"`` (a multispectral plain ViT in timm's names, as torchgeo
    publishes them); an error for anything else."""
    keys = set(state)
    if "embeddings.cls_token" in keys and any(_HF_LAYER.match(k) for k in keys):
        return "hf"
    if not any(_BLOCK.match(k) for k in keys) or "cls_token" not in keys:
        sample = sorted(keys)[:6]
        raise CheckpointError(f"unknown checkpoint layout (first keys {sample}); geo_dino reads timm, the "
                              "official DINO/DINOv2/DINOv3 and Hugging Face transformers layouts")
    if "storage_tokens" in keys or "rope_embed.periods" in keys or "register_tokens" in keys \
            or "blocks.0.ls1.gamma" in keys and "reg_token" not in keys and "pos_embed" not in keys \
            or any(k.endswith((".mlp.w12.weight", ".mlp.w3.weight")) for k in keys):
        return "official"
    if "mask_token" in keys and "pos_embed" in keys:
        return "official"  # DINOv2 official keeps its mask token
    w = state.get("patch_embed.proj.weight")
    plain = "pos_embed" in keys and not keys & {"reg_token", "blocks.0.ls1.gamma", "blocks.0.gamma_1"}
    if plain and w is not None and len(w.shape) == 4 and w.shape[1] != 3:
        return "torchgeo"
    return "timm"


def inspect_state(state: dict[str, Any]) -> Detected:
    """Layout and architecture facts of a state dict (after wrapper prefixes are stripped)."""
    state = _strip(state)
    layout = detect_layout(state)
    keys = set(state)
    n_params = int(sum(int(v.numel()) for v in state.values() if hasattr(v, "numel")))
    if layout == "hf":
        dinov2 = "embeddings.position_embeddings" in keys
        w = state["embeddings.patch_embeddings.projection.weight" if dinov2
                  else "embeddings.patch_embeddings.weight"]
        depth = 1 + max(int(m.group(1)) for k in keys if (m := _HF_LAYER.match(k)))
        regs = state["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in keys else 0
        mlp = "swiglu" if any(k.endswith(("mlp.gate_proj.weight", "mlp.weights_in.weight")) for k in keys) \
            else "mlp"
        qkv_bias = any(k.endswith("attention.q_proj.bias") for k in keys) and not dinov2
        grid = _grid_side(state["embeddings.position_embeddings"].shape[1] - 1) if dinov2 else None
        return Detected("hf", "dinov2" if dinov2 else "dinov3", int(w.shape[0]), depth, int(w.shape[-1]),
                        int(regs), mlp, qkv_bias, n_params, grid, int(w.shape[1]))
    w = state["patch_embed.proj.weight"]
    depth = 1 + max(int(m.group(1)) for k in keys if (m := _BLOCK.match(k)))
    reg_key = next((k for k in ("reg_token", "storage_tokens", "register_tokens") if k in keys), None)
    regs = int(state[reg_key].shape[1]) if reg_key else 0
    rope = "rope_embed.periods" in keys or "storage_tokens" in keys or "blocks.0.gamma_1" in keys
    if rope:
        family = "dinov3"
    elif "blocks.0.ls1.gamma" in keys:
        family = "dinov2"
    else:
        family = "dino"
    swiglu = any(re.search(r"mlp\.(w12|w1|fc1_g|fc1_x)\.weight$", k) for k in keys)
    qkv_bias = any(k.endswith("attn.q_bias") for k in keys) or (
        family == "dinov3" and any(k.endswith("attn.qkv.bias") for k in keys))
    grid = None
    if "pos_embed" in keys:
        n = state["pos_embed"].shape[1]
        # timm's DINOv2-with-registers keeps no position for the CLS token (no_embed_class); all others do
        with_cls = not (layout == "timm" and regs > 0 and family == "dinov2")
        grid = _grid_side(n - 1 if with_cls else n)
    return Detected(layout, family, int(w.shape[0]), depth, int(w.shape[-1]), regs,
                    "swiglu" if swiglu else "mlp", qkv_bias, n_params, grid, int(w.shape[1]))


def _grid_side(n: int) -> int:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise CheckpointError(f"position embedding of {n} tokens is not a square grid")
    return side


def _hf_dinov3_to_timm(state: dict[str, Any]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    per_layer: dict[int, dict[str, Any]] = {}
    for k, v in state.items():
        m = _HF_LAYER.match(k)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[k[m.end():]] = v
            continue
        if k == "embeddings.mask_token":
            continue  # pretraining only
        name = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "reg_token",
                "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
                "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
                "norm.weight": "norm.weight", "norm.bias": "norm.bias"}.get(k)
        if name is None:
            raise CheckpointError(f"unexpected key {k!r} in a Hugging Face DINOv3 checkpoint")
        out[name] = v
    for i, p in sorted(per_layer.items()):
        b = f"blocks.{i}."
        out[b + "attn.qkv.weight"] = torch.cat([p.pop("attention.q_proj.weight"),
                                                 p.pop("attention.k_proj.weight"),
                                                 p.pop("attention.v_proj.weight")])
        if "attention.q_proj.bias" in p:
            out[b + "attn.q_bias"] = p.pop("attention.q_proj.bias")
            out[b + "attn.v_bias"] = p.pop("attention.v_proj.bias")
            kb = p.pop("attention.k_proj.bias", None)
            if kb is not None and bool(kb.abs().max() > 0):
                raise CheckpointError(f"layer {i}: a non-zero key bias cannot be represented "
                                      "(DINOv3 has none)")
        simple = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
                  "norm2.bias": "norm2.bias", "attention.o_proj.weight": "attn.proj.weight",
                  "attention.o_proj.bias": "attn.proj.bias", "layer_scale1.lambda1": "gamma_1",
                  "layer_scale2.lambda1": "gamma_2", "mlp.down_proj.weight": "mlp.fc2.weight",
                  "mlp.down_proj.bias": "mlp.fc2.bias"}
        if "mlp.gate_proj.weight" in p:
            simple |= {"mlp.gate_proj.weight": "mlp.fc1_g.weight", "mlp.gate_proj.bias": "mlp.fc1_g.bias",
                       "mlp.up_proj.weight": "mlp.fc1_x.weight", "mlp.up_proj.bias": "mlp.fc1_x.bias"}
        else:
            simple |= {"mlp.up_proj.weight": "mlp.fc1.weight", "mlp.up_proj.bias": "mlp.fc1.bias"}
        for src, dst in simple.items():
            if src in p:
                out[b + dst] = p.pop(src)
        if p:
            raise CheckpointError(f"layer {i}: unexpected keys {sorted(p)} "
                                  "in a Hugging Face DINOv3 checkpoint")
    return out


def _hf_dinov2_to_official(state: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` names → the official DINOv2 names (which
    timm's own filter then converts)."""
    import torch

    out: dict[str, Any] = {}
    per_layer: dict[int, dict[str, Any]] = {}
    top = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.register_tokens": "register_tokens", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    for k, v in state.items():
        m = _HF_LAYER.match(k)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[k[m.end():]] = v
        elif k in top:
            out[top[k]] = v
        else:
            raise CheckpointError(f"unexpected key {k!r} in a Hugging Face DINOv2 checkpoint")
    if "mask_token" in out and out["mask_token"].dim() == 2:
        out["mask_token"] = out["mask_token"][None]
    old_names = {"attention.attention.query": "attention.q_proj",
                 "attention.attention.key": "attention.k_proj",
                 "attention.attention.value": "attention.v_proj",
                 "attention.output.dense": "attention.o_proj"}
    for i, p in sorted(per_layer.items()):
        for o, n in old_names.items():  # transformers 4.x names
            for suffix in (".weight", ".bias"):
                if o + suffix in p:
                    p[n + suffix] = p.pop(o + suffix)
        b = f"blocks.{i}."
        out[b + "attn.qkv.weight"] = torch.cat([p.pop(f"attention.{c}_proj.weight") for c in "qkv"])
        out[b + "attn.qkv.bias"] = torch.cat([p.pop(f"attention.{c}_proj.bias") for c in "qkv"])
        names = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1",
                 "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3"}
        for src, dst in names.items():
            for suffix in (".weight", ".bias"):
                if src + suffix in p:
                    out[b + dst + suffix] = p.pop(src + suffix)
        if "mlp.gate_proj.weight" in p:  # transformers 5.x SwiGLU: gate and up stacked as the packed w12
            for suffix in (".weight", ".bias"):
                out[b + "mlp.w12" + suffix] = torch.cat([p.pop("mlp.gate_proj" + suffix),
                                                         p.pop("mlp.up_proj" + suffix)])
                out[b + "mlp.w3" + suffix] = p.pop("mlp.down_proj" + suffix)
        out[b + "ls1.gamma"] = p.pop("layer_scale1.lambda1")
        out[b + "ls2.gamma"] = p.pop("layer_scale2.lambda1")
        if p:
            raise CheckpointError(f"layer {i}: unexpected keys {sorted(p)} "
                                  "in a Hugging Face DINOv2 checkpoint")
    out.setdefault("mask_token", torch.zeros(1, 1, out["cls_token"].shape[-1]))  # marks the DINOv2 layout
    return out


def to_timm(state: dict[str, Any], detected: Detected, model: Any) -> dict[str, Any]:
    """The state dict in timm's names for ``model`` (a timm model of the detected architecture)."""
    state = _strip(state)
    if detected.layout == "timm":
        return state
    if detected.layout == "torchgeo":  # timm's names; the classifier torchgeo's loader ignores is dropped
        return {k: v for k, v in state.items() if not k.startswith("head.")}
    if detected.layout == "hf" and detected.family == "dinov3":
        return _hf_dinov3_to_timm(state)
    if detected.layout == "hf":
        state = _hf_dinov2_to_official(state)
    if detected.family == "dinov3":
        from timm.models.eva import checkpoint_filter_fn as eva_filter_fn

        return eva_filter_fn(dict(state), model)
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(state), model)


def fitting_archs(detected: Detected, in_chans: int | None = None) -> list[str]:
    """Registered architectures whose tensors match (the test architecture excluded); ``in_chans``: the bands
    the checkpoint's metadata declares."""
    from geo_dino.models.archs import ARCHS

    return [n for n, a in ARCHS.items() if a.family != "test" and not detected.matches(a, in_chans)]


@dataclass(frozen=True)
class PublishedMatch:
    """A registered published file that a local file (or a sha256) is.

    ``by``: ``"sha256"`` (the whole digest is the published one), ``"sha256 prefix"`` (a prefix of at least 8
    hex digits given by the user, as in torchgeo's file names) or ``"file name"`` (the name only: nothing
    about the bytes is known, or they differ). ``verified``: the file's own bytes hash to the published
    sha256.
    """

    arch: str
    weights: str  # the publisher's name, e.g. torchgeo.models.ViTSmall16_Weights.SENTINEL2_ALL_DINO
    sha256: str  # the published file's
    by: Literal["sha256", "sha256 prefix", "file name"]
    verified: bool


_HEX = re.compile(r"^[0-9a-f]{8,64}$")


def identify_published(path: str | Path | None = None, *, sha256: str | None = None) -> PublishedMatch | None:
    """Which registered published weights file ``path`` is, or the file a ``sha256`` (whole, or a prefix of at
    least 8 hex digits) belongs to; None when none. Never opens the file as a checkpoint.

    The bytes decide: an existing file is hashed (and must agree with ``sha256`` when both are given). Only
    when the bytes match nothing is the file name compared with the published names (``…-36bcc127.pth`` or the
    same without the hash suffix), and such a match says so (``by="file name"``, not verified). The
    architecture a run builds is still the configured one: this only tells the user what they hold.
    """
    from geo_dino.models.archs import ARCHS

    given = sha256.strip().lower() if sha256 else None
    if given is not None and not _HEX.match(given):
        raise CheckpointError(f"sha256 {sha256!r}: give the whole hex digest or at least its first 8 digits")
    p = Path(path) if path is not None else None
    digest = sha256_file(p) if p is not None and p.is_file() else None
    if digest and given and not digest.startswith(given):
        raise CheckpointError(f"{p}: its sha256 {digest} does not start with the given {given}")
    published = [(n, a.published) for n, a in ARCHS.items() if a.published is not None]
    key = digest or given
    if key:
        for name, w in published:
            if w.sha256 == key or (len(key) < 64 and w.sha256.startswith(key)):
                by: Literal["sha256", "sha256 prefix"] = "sha256" if len(key) == 64 else "sha256 prefix"
                return PublishedMatch(name, w.name, w.sha256, by, digest == w.sha256)
    if p is not None:
        for name, w in published:
            bare = w.file_name.replace(f"-{w.hash_prefix}.", ".") if w.hash_prefix else w.file_name
            if p.name in (w.file_name, bare):
                return PublishedMatch(name, w.name, w.sha256, "file name", False)
    return None


def inspect_file(path: Any) -> dict[str, Any]:
    """What a checkpoint file is: hash, format, layout, architecture facts, the registry entries it fits with
    their licence and preprocessing, and the metadata stored in it. Never executes code from the file."""
    from geo_dino.models.archs import ARCHS

    p = Path(path)
    state, meta = read_state_dict(p, None)
    d = inspect_state(state)
    fits = fitting_archs(d, declared_chans(meta))
    match = identify_published(p)
    return {
        "path": str(p), "sha256": sha256_file(p), "size_bytes": p.stat().st_size,
        "format": "safetensors" if p.suffix == ".safetensors" else "torch (weights_only)",
        "layout": d.layout, "family": d.family, "embed_dim": d.embed_dim, "depth": d.depth,
        "patch_size": d.patch_size, "in_chans": d.in_chans, "registers": d.n_registers, "mlp": d.mlp,
        "qkv_bias": d.qkv_bias, "parameters": d.n_params,
        "published": None if match is None else {"arch": match.arch, "weights": match.weights,
                                                 "by": match.by, "verified": match.verified},
        "architectures": [{"name": n, "licence": ARCHS[n].licence, "mean": ARCHS[n].mean, "std": ARCHS[n].std,
                           "gsd_m": ARCHS[n].gsd_m, "training_data": ARCHS[n].training_data} for n in fits],
        "metadata": meta,
    }


def declared_chans(meta: dict[str, str]) -> int | None:
    """The input bands a checkpoint's metadata declares (None: not stated or not a number)."""
    value = meta.get("in_chans", "")
    return int(value) if value.isdigit() else None


def read_state_dict(path: Path, expected_sha256: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and metadata of a local checkpoint file, after checking its hash. Never executes code."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} "
                              "(weights are never downloaded; give a local path)")
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise CheckpointError(f"{path}: sha256 {digest} does not match backbone.checkpoint_sha256 "
                              f"{expected_sha256}; the file changed or is not the one you pinned")
    with path.open("rb") as fh:
        head = fh.read(8)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        if head[:2] == b"\x80\x02" or head[:2] == b"PK":
            raise CheckpointError(f"{path}: a pickle/zip file disguised as .safetensors; refused")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file: {exc}") from None
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 10):
        raise CheckpointError(f"torch {torch.__version__} is older than 2.10: loading .pth files is refused "
                              "(CVE-2026-24747); convert the checkpoint to safetensors or upgrade torch")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {exc}") from None
    for key in ("model", "state_dict", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a flat state dict of tensors")
    return obj, {}
