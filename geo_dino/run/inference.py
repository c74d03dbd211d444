"""Windowed inference and blending: tiles in batches → backbone → heads → a blended strip accumulator.

Tiles run row by row. Each adds ``value × weight`` and ``weight`` (2-D Hann weights) into a
:class:`StripAccumulator`, a float32 strip in memory one tile high and as wide as the output grid. When a
tile row is done, the rows above the next tile row are final: they go to the output writer
(:class:`geo_dino.run.writing.OutputWriter`) and the strip slides down one stride. Peak memory depends on the
tile, the batch and the output's width, never on the raster's height.

Chunks of tile rows are independent: each starts from an empty strip. The overlap rows two neighbouring
chunks share (a *band*) are written by neither. The chunk above keeps its raw sums over the band (the rows
left open after its last tile row); the chunk below keeps each of its tiles' own terms over the band
(values and weights, recorded by :meth:`StripAccumulator.add`), :class:`ChunkResult`. :func:`merge_band`
starts from the first and adds the second's terms in tile order, with the very operations one strip over
both chunks would have done: the outputs are bit for bit those of one strip over the whole region, whatever
the chunking, the number of workers and the order the chunks finish in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geo_dino.files import atomic_write
from geo_dino.inputs.grid import Grid, PixelBox, Tile, blend_weights
from geo_dino.inputs.preprocess import Preprocessor
from geo_dino.inputs.sources import WindowReader
from geo_dino.models.label_free import LabelFreeHeads, upsampled_cosine_distance

if TYPE_CHECKING:
    from geo_dino.run.plan import RunPlan


def _save_npy(path: Path, arr: np.ndarray) -> None:
    np.save(path, arr)


@dataclass(frozen=True)
class ChannelLayout:
    """Which accumulator band holds what: per date PCA, k-means scores and a segmentation head's logits; then
    the label-free change (the feature distance, then the spectral score); then a change head's logits; then
    the weight."""

    n_dates: int
    n_pca: int
    k: int
    n_seg: int = 0  # a supervised segmentation head's classes (logits per date)
    n_change_logits: int = 0  # a supervised change head's classes

    @classmethod
    def of(cls, plan: RunPlan, heads: LabelFreeHeads) -> ChannelLayout:
        """The layout of a run: its dates, the fitted label-free heads and the planned supervised head."""
        k = len(plan.head.values) if plan.head else 0
        change = plan.head is not None and plan.head.task == "change"
        return cls(plan.n_dates, heads.n_pca, heads.k, n_seg=0 if change else k,
                   n_change_logits=k if change else 0)

    @property
    def per_date(self) -> int:
        """Bands per date: PCA components, k-means scores and segmentation logits."""
        return self.n_pca + self.k + self.n_seg

    @property
    def has_change(self) -> bool:
        """Whether there is a label-free change band (two dates)."""
        return self.n_dates == 2

    @property
    def n_values(self) -> int:
        """Number of value bands (all dates, change, change-head logits); the weight band follows."""
        return self.n_dates * self.per_date + 2 * int(self.has_change) + self.n_change_logits

    def seg(self, date: int) -> slice:
        """The segmentation head's logit bands of ``date``."""
        s = date * self.per_date + self.n_pca + self.k
        return slice(s, s + self.n_seg)

    @property
    def change_logits(self) -> slice:
        """The change head's logit bands."""
        s = self.n_dates * self.per_date + 2 * int(self.has_change)
        return slice(s, s + self.n_change_logits)

    def pca(self, date: int) -> slice:
        """The PCA bands of ``date``."""
        return slice(date * self.per_date, date * self.per_date + self.n_pca)

    def scores(self, date: int) -> slice:
        """The k-means score bands (dot products with the centroids) of ``date``."""
        s = date * self.per_date + self.n_pca
        return slice(s, s + self.k)

    @property
    def change(self) -> int:
        """The feature change band (cosine distance between the dates' upsampled features)."""
        return self.n_dates * self.per_date

    @property
    def change_spectral(self) -> int:
        """The spectral change band (:class:`~geo_dino.models.change.SpectralChange` score; 0 when not
        computed)."""
        return self.n_dates * self.per_date + 1

    @property
    def weight(self) -> int:
        """The blend-weight band (the last one)."""
        return self.n_values


def pick_device(choice: str) -> str:
    """The torch device for ``backbone.device``: ``"auto"`` picks CUDA when a GPU is visible, else CPU."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        from geo_dino.errors import ConfigError

        raise ConfigError("backbone.device: cuda requested but no GPU is visible; use 'auto' or 'cpu'")
    return choice


class FeatureExtractor:
    """Backbone + preprocessing on one device; returns dense features per date for a batch of tiles."""

    def __init__(self, model, preprocessor: Preprocessor, device: str,  # noqa: ANN001
                 model_size: int | None = None, layers: tuple[int, ...] = (),
                 shift_average: bool = False, change_layers: tuple[int, ...] = ()) -> None:
        import torch

        # features averaged over offsets 0 and half a patch, on a grid twice as fine (shift_averaged)
        self.shift_average = bool(shift_average)
        self.model_size = model_size  # tiles resized to this many pixels (GSD resampling), None: native
        # blocks whose dense features are concatenated (a multi-layer head's input); () = the last block only
        self.layers = tuple(layers)
        # blocks whose features the label-free feature change compares (their cosine distances averaged),
        # appended after the part above; () = the part above's deepest layer
        depth = len(model.blocks)
        self.change_layers = tuple(sorted({int(i) % depth for i in change_layers}))

        # on a GPU the weights themselves are bf16 (measured on one H200: 2,014 img/s for ViT-L/16 vs 1,709
        # under autocast, same accuracy: relative error 3.8e-3 vs fp32); fp32 on CPU
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = model.to(device=device, dtype=self.dtype)
        self.pre = preprocessor
        self.device = device

    @property
    def n_main(self) -> int:
        """Channels of the main part of :meth:`features` (the last block, or the :attr:`layers`)."""
        return int(self.model.embed_dim) * max(len(self.layers), 1)

    def main(self, f):  # noqa: ANN001, ANN201 - torch tensors
        """The main part of :meth:`features`: what a trained head takes."""
        return f[:, :self.n_main] if self.change_layers else f

    def deepest(self, f):  # noqa: ANN001, ANN201 - torch tensors
        """The deepest hooked layer's part of :meth:`features` (what the label-free heads use)."""
        c = int(self.model.embed_dim)
        return f[:, self.n_main - c:self.n_main] if (self.layers or self.change_layers) else f

    def change_distance(self, f1, f2, size: tuple[int, int]):  # noqa: ANN001, ANN201 - torch tensors
        """The feature change ``(B, 1, H, W)`` of two dates' :meth:`features`: the cosine distance of the
        upsampled features, averaged over :attr:`change_layers` (or of the deepest layer)."""
        if not self.change_layers:
            return upsampled_cosine_distance(self.deepest(f1), self.deepest(f2), size)
        c = int(self.model.embed_dim)
        parts = [upsampled_cosine_distance(f1[:, s:s + c], f2[:, s:s + c], size)
                 for s in range(self.n_main, f1.shape[1], c)]
        return sum(parts[1:], parts[0]) / len(parts)

    def forward(self, x):  # noqa: ANN001, ANN201 - torch tensors (B, bands, H, W) -> (B, C·L, h, w)
        """Dense features of preprocessed pixels: the last block's, or the concatenated :attr:`layers`; with
        :attr:`shift_average`, on the grid twice as fine (:func:`shift_averaged`)."""
        if self.shift_average:
            return shift_averaged(self._forward, x, int(self.model.patch_embed.patch_size[0]))
        return self._forward(x)

    def patch_grid(self, f):  # noqa: ANN001, ANN201 - torch tensors
        """Features on the patch grid (the feature cube's cells): as they are, or 2×2-averaged back from the
        finer grid of :attr:`shift_average`."""
        import torch

        return torch.nn.functional.avg_pool2d(f, 2) if self.shift_average else f

    def _forward(self, x):  # noqa: ANN001, ANN202
        import torch

        from geo_dino.models.backbone import dense_features, extract

        if not self.layers and not self.change_layers:
            return dense_features(self.model, x)
        depth = len(self.model.blocks)
        wanted = tuple(sorted({i % depth for i in self.layers} | set(self.change_layers)))
        got = extract(self.model, x, wanted)
        main = [got.dense] if not self.layers else [got.layers[i % depth] for i in self.layers]
        return torch.cat(main + [got.layers[i] for i in self.change_layers], dim=1)

    def features(self, reader: WindowReader, boxes: Sequence[PixelBox],
                 cache: Sequence[Path | None] | None = None, store: bool = False) -> tuple[Any, np.ndarray]:
        """``(feats (B, C, h, w) float32, valid (B, H, W) bool numpy)`` for one date.

        ``cache`` (one path or None per box): features already computed for a box are loaded from its
        ``.npy`` file instead of running the backbone again; with ``store``, features computed now are saved
        there (the heads' fitting pass stores, inference reuses: no tile goes through the backbone twice).
        """
        import torch

        reads = reader.read_many(list(boxes))
        valid = np.stack([r[1] for r in reads])
        cache = list(cache) if cache is not None else [None] * len(boxes)
        have = [p is not None and p.exists() for p in cache]
        need = [i for i, h in enumerate(have) if not h]
        out: list = [None] * len(boxes)
        if need:
            data = np.stack([reads[i][0] for i in need])
            x = torch.from_numpy(self.pre(data, valid[need])).to(self.device, dtype=self.dtype,
                                                                  non_blocking=True)
            if self.model_size is not None and self.model_size != x.shape[-1]:
                x = torch.nn.functional.interpolate(x, size=(self.model_size, self.model_size),
                                                    mode="bilinear", antialias=True, align_corners=False)
            f = self.forward(x).float().cpu().contiguous()  # one memory layout, cached or not: same sums
            if len(need) == len(boxes) and not store:
                return f, valid  # nothing cached, nothing to store: the batch as computed
            for j, i in enumerate(need):
                out[i] = f[j]
                path = cache[i]
                if store and path is not None:
                    atomic_write(path, partial(_save_npy, arr=f[j].numpy()), suffix=".npy")
        for i, (h, path) in enumerate(zip(have, cache, strict=True)):
            if h and path is not None:  # have[i] implies a path
                out[i] = torch.from_numpy(np.load(path))
        return torch.stack(out), valid


def shift_averaged(fn, x, patch: int):  # noqa: ANN001, ANN201 - torch tensors
    """Dense features of ``x (B, bands, H, W)`` on a grid of half-patch cells ``(B, C, 2H/p, 2W/p)``: the mean
    of the features at offset 0 and at offset ``p/2`` in both axes.

    ``fn`` maps pixels to patch features (``(B, C, H/p, W/p)``). The shifted pass sees ``x`` reflect-padded
    by ``p/2`` on every side, so its patches straddle the unshifted ones; each half-patch cell lies in exactly
    one patch of each pass, and takes the mean of the two. The patch grid's blocks (a checkerboard in maps
    made from the features) are halved in size and their edges no longer line up; the backbone runs twice.
    """
    import torch

    if patch % 2:
        from geo_dino.errors import ConfigError

        raise ConfigError(f"backbone.shift_average needs an even patch size, not {patch}")
    half = patch // 2
    f0 = fn(x)
    fs = fn(torch.nn.functional.pad(x, (half, half, half, half), mode="reflect"))
    i = torch.arange(2 * f0.shape[-2], device=f0.device)
    j = torch.arange(2 * f0.shape[-1], device=f0.device)
    a = f0.index_select(-2, i // 2).index_select(-1, j // 2)
    b = fs.index_select(-2, (i + 1) // 2).index_select(-1, (j + 1) // 2)
    return (a + b) * 0.5


def feature_cache_paths(cache_dir: Path | None, date: int, tiles: Sequence[Tile]) -> list[Path | None] | None:
    """The ``.npy`` feature-cache file of each tile of ``date`` in ``cache_dir`` (None: no cache)."""
    if cache_dir is None:
        return None
    return [cache_dir / f"d{date}_t{t.index}.npy" for t in tiles]


def sample_patch_features(extractor: FeatureExtractor, readers: Sequence[WindowReader], tiles: Sequence[Tile],
                          batch_size: int, max_patches: int = 20_000, seed: int = 0,
                          cache_dir: Path | None = None) -> np.ndarray:
    """Patch features ``(N, C)`` of mostly-valid patches from ``tiles`` of every date (for fitting heads)."""
    import torch

    rng = np.random.default_rng(seed)
    out = []
    for k in range(0, len(tiles), batch_size):
        batch = tiles[k:k + batch_size]
        boxes = [t.box for t in batch]
        for d, reader in enumerate(readers):
            f, valid = extractor.features(reader, boxes, feature_cache_paths(cache_dir, d, batch), store=True)
            f = extractor.deepest(f)
            frac = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(valid).float()[:, None],
                                                           tuple(f.shape[-2:]))[:, 0]
            keep = (frac >= 0.75).cpu().numpy()
            out.append(f.permute(0, 2, 3, 1).cpu().numpy()[keep])
    x = np.concatenate(out) if out else np.zeros((0, 1), np.float32)
    if x.shape[0] > max_patches:
        x = x[rng.choice(x.shape[0], max_patches, replace=False)]
    return x


def read_batch(extractor: FeatureExtractor, readers: Sequence[WindowReader],
               spectral_readers: Sequence[WindowReader] | None, batch: Sequence[Tile],
               cache_dir: Path | None = None) -> tuple[list[Any], list[np.ndarray], list[np.ndarray] | None]:
    """One batch of tiles on every date: the features ``(B, C, h, w)`` of each date, the validity
    ``(B, H, W)`` of every read (each date's, then each spectral read's) and, with ``spectral_readers``, each
    date's raw bands ``(B, S, H, W)`` in the source's dtype (else None)."""
    boxes = [t.box for t in batch]
    feats, valids = [], []
    for d, reader in enumerate(readers):
        f, valid = extractor.features(reader, boxes, feature_cache_paths(cache_dir, d, batch))
        feats.append(f)
        valids.append(valid)
    bands = None
    if spectral_readers is not None:
        reads = [r.read_many(boxes) for r in spectral_readers]
        bands = [np.stack([a for a, _ in rd]) for rd in reads]
        valids += [np.stack([v for _, v in rd]) for rd in reads]
    return feats, valids, bands


def sample_change_pixels(extractor: FeatureExtractor, readers: Sequence[WindowReader],
                         spectral_readers: Sequence[WindowReader] | None, tiles: Sequence[Tile],
                         batch_size: int, n_pixels: int, seed: int = 0,
                         cache_dir: Path | None = None) -> tuple[np.ndarray | None, np.ndarray | None,
                                                                 np.ndarray]:
    """Pixels valid on both dates, sampled evenly from ``tiles``: the two dates' spectral bands ``(N, S)``
    (None without ``spectral_readers``) and the feature distance ``(N,)`` at the same pixels (to fit the
    label-free change scores). Features come from the fit pass's cache."""
    import torch

    rng = np.random.default_rng(seed)
    per_tile = max(1, n_pixels // max(len(tiles), 1))
    x1s, x2s, fds = [], [], []
    for k in range(0, len(tiles), batch_size):
        batch = tiles[k:k + batch_size]
        feats, valids, spec = read_batch(extractor, readers, spectral_readers, batch, cache_dir)
        ok = np.logical_and.reduce(valids)
        with torch.inference_mode():
            fd = extractor.change_distance(feats[0], feats[1], ok.shape[-2:])[:, 0].numpy()
        for i in range(len(batch)):
            rows, cols = np.nonzero(ok[i])
            if rows.size == 0:
                continue
            pick = rng.choice(rows.size, min(per_tile, rows.size), replace=False)
            r, c = rows[pick], cols[pick]
            fds.append(fd[i, r, c])
            if spec is not None:
                x1s.append(spec[0][i][:, r, c].T.astype(np.float64))
                x2s.append(spec[1][i][:, r, c].T.astype(np.float64))
    if not fds:
        from geo_dino.errors import GeoDinoError

        raise GeoDinoError("no pixel is valid on both dates in the tiles sampled to fit the change scores")
    x1 = np.concatenate(x1s) if x1s else None
    x2 = np.concatenate(x2s) if x2s else None
    return x1, x2, np.concatenate(fds)


class StripAccumulator:
    """Weighted sums over the open strip of the output grid: one tile height, the full output width.

    Tiles arrive row by row. When a tile row is done, the rows above the next tile row's first row can no
    longer change: :meth:`advance` hands them out (blended) and slides the strip down by the stride. Memory is
    ``(n_values + 1) × tile size × output width`` floats — it does not grow with the raster's height, and
    nothing scene-sized is written to disk. Between chunk tasks only the ``overlap`` rows still open are
    carried (:meth:`save` / :meth:`load`).
    """

    def __init__(self, grid: Grid, n_values: int, size: int, stride: int, top: int = 0) -> None:
        import torch

        self.grid = grid
        self.size = size
        self.stride = stride
        self.top = top  # output-grid row of strip row 0
        # the terms each tile adds to output rows above this row (a chunk's top band), in order
        self.record_until = top
        self.recorded: list[tuple[PixelBox, np.ndarray, np.ndarray]] = []
        self.buf = np.zeros((n_values + 1, size, grid.width), dtype=np.float32)
        self._buf_t = torch.from_numpy(self.buf)  # the same memory, for torch's fused multi-threaded ops

    def add(self, box: PixelBox, values: np.ndarray, weight: np.ndarray) -> None:
        """Add ``values (n, h, w) × weight (h, w)`` and ``weight`` over ``box`` (output-grid pixels, clipped).
        ``values`` (float32) is left as it is."""
        strip = PixelBox(self.top, 0, self.size, self.grid.width).intersection(self.grid.box)
        inner = box.intersection(strip) if strip is not None else None
        if inner is None:
            return
        import torch

        if inner.row_off < self.top or inner.row_end > self.top + self.size:
            raise ValueError("a tile outside the open strip: tiles must come row by row")
        rs, cs = inner.relative_to(box).slices()
        dst_r = slice(inner.row_off - self.top, inner.row_end - self.top)
        dst_c = slice(inner.col_off, inner.col_end)
        w_np = np.ascontiguousarray(weight[rs, cs], dtype=np.float32)
        w = torch.from_numpy(w_np)
        v = torch.from_numpy(values[:, rs, cs])
        if inner.row_off < self.record_until:  # the part of the term over the band (for merge_band)
            k = min(inner.row_end, self.record_until) - inner.row_off
            self.recorded.append((PixelBox(inner.row_off, inner.col_off, k, inner.width),
                                  values[:, rs, cs][:, :k].copy(), w_np[:k].copy()))
        dst = self._buf_t[:, dst_r, dst_c]
        # torch's fused, multi-threaded in-place ops on views of the strip (measured 1.8× numpy's multiply
        # then add on a 16384-wide strip, 2 cores)
        dst[:-1].addcmul_(v, w)
        dst[-1].add_(w)

    def advance(self, last: bool, sink) -> None:  # noqa: ANN001 - sink(first_row, values, weight)
        """Hand the rows that are final now (all open rows when ``last``) to ``sink`` as ``(first output row,
        blended values (n, h, W) with NaN where no weight, weight (h, W))``, then slide the strip one stride.

        Rows above :attr:`record_until` (a chunk's top band) are not handed out: the merge blends them from
        both chunks (:func:`merge_band`). The values are divided in place in the strip (those rows are
        dropped right after), so no scene-wide temporary is allocated; ``sink`` must not keep references to
        them.
        """
        h = min(self.size if last else self.stride, self.grid.height - self.top)
        k = min(max(self.record_until - self.top, 0), h)
        if h > k:
            vals, w = blend(self._buf_t[:, k:h])
            sink(self.top + k, vals, w)
        keep = self.size - self.stride
        self._buf_t[:, :keep] = self._buf_t[:, self.stride:self.size].clone()
        self._buf_t[:, keep:] = 0
        self.top += self.stride

    def open_rows(self, height: int) -> np.ndarray:
        """A copy of the raw sums ``(n + 1, height, W)`` of the strip's first ``height`` rows: after a chunk's
        last tile row, its bottom band (the rows the next chunk's tiles also cover)."""
        return self.buf[:, :height].copy()


def blend(sums) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - a torch tensor (n + 1, h, W)
    """Blend raw sums in place: ``(values (n, h, W) = sums / weight, NaN where no weight; weight (h, W))``
    (numpy views of ``sums``)."""
    import torch

    w = sums[-1]
    inv = torch.where(w > 0, w.reciprocal(), torch.full_like(w, float("nan")))  # NaN where nothing was added
    sums[:-1].mul_(inv)
    return sums[:-1].numpy(), sums[-1].numpy()


@dataclass
class ChunkResult:
    """What a chunk task leaves for the merge: its tiles' terms over its top band (rows it shares with the
    chunk above: ``(box, values (n, h, w), weight (h, w))`` in the order they were added; empty for the first
    chunk), its raw sums ``(n + 1, h, W)`` over its bottom band (shared with the chunk below; None for the
    last chunk) and the change histogram of the rows it wrote."""

    top: list[tuple[PixelBox, np.ndarray, np.ndarray]]
    bottom: np.ndarray | None
    hist: np.ndarray

    def save(self, path: Path, **extra: np.ndarray) -> None:
        """Write it atomically: the file's presence says the chunk is done."""
        from geo_dino.files import save_npz

        boxes = [[b.row_off, b.col_off, b.height, b.width] for b, _, _ in self.top]
        arrays = {"hist": self.hist, "top_boxes": np.array(boxes, np.int64).reshape(-1, 4)}
        for i, (_, v, w) in enumerate(self.top):
            arrays[f"top_v{i}"], arrays[f"top_w{i}"] = v, w
        if self.bottom is not None:
            arrays["bottom"] = self.bottom
        save_npz(path, arrays | extra)

    @classmethod
    def load(cls, path: Path) -> ChunkResult:
        """Read a saved result."""
        with np.load(path, allow_pickle=False) as z:
            top = [(PixelBox(*(int(x) for x in b)), z[f"top_v{i}"], z[f"top_w{i}"])
                   for i, b in enumerate(z["top_boxes"])]
            return cls(top, z["bottom"] if "bottom" in z.files else None, z["hist"])


def band_rows(grid: Grid, chunks: Sequence[Sequence[Sequence[Tile]]], stride: int, overlap: int,
              chunk: int) -> tuple[int, int]:
    """Output rows ``[first, end)`` of the band chunk ``chunk`` shares with the chunk above (empty for the
    first chunk)."""
    first = chunks[chunk][0][0].grid_row * stride
    return first, (min(first + overlap, grid.height) if chunk else first)


def merge_band(above: ChunkResult, below: ChunkResult, grid: Grid, size: int, stride: int,
               first: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """The blended output rows ``[first, end)`` of one band: the raw sums the chunk above left, then the
    terms of the chunk below's tiles added in their order, exactly as one strip over both chunks adds them.
    Returns ``(values (n, h, W), weight (h, W))``."""
    if above.bottom is None:
        raise ValueError("a band needs the raw sums the chunk above left open")
    h = end - first
    if above.bottom.shape[1] < h:
        raise ValueError(f"a band of {h} rows, but the chunk above kept {above.bottom.shape[1]}")
    acc = StripAccumulator(grid, above.bottom.shape[0] - 1, size, stride, top=first)
    acc.buf[:, :h] = above.bottom[:, :h]
    for box, v, w in below.top:
        if box.row_off < first or box.row_end > end:
            raise ValueError(f"a recorded term over rows {box.row_off}..{box.row_end} is not in the band "
                             f"{first}..{end}")
        acc.add(box, v, w)
    import torch

    return blend(torch.from_numpy(acc.buf)[:, :h])


def infer_tiles(extractor: FeatureExtractor, readers: Sequence[WindowReader], heads: LabelFreeHeads,
                layout: ChannelLayout, tiles: Iterable[Tile], out_origin: PixelBox, acc: StripAccumulator,
                tile_size: int, batch_size: int, cache_dir: Path | None = None, runner=None,  # noqa: ANN001
                cube=None, spectral=None,  # noqa: ANN001
                spectral_readers: Sequence[WindowReader] | None = None,
                on_batch: Callable[[int], None] | None = None) -> int:
    """Run ``tiles`` (one tile row) through backbone and heads; blend the per-pixel results into ``acc``.

    ``runner``: a :class:`~geo_dino.run.heads.HeadRunner` (a trained head) or None; ``cube``: a callable
    ``cube(tiles, features of date 1)`` that stores the patch features (the feature cube) or None;
    ``spectral``: the run's :class:`~geo_dino.models.change.SpectralChange` with ``spectral_readers`` (the two
    dates' spectral bands), or None (the spectral change band stays 0); ``on_batch``: called with the number
    of tiles of each batch once it is blended (progress)."""
    import torch

    hann = blend_weights(tile_size)
    tiles = list(tiles)
    # each date's spectral bands (raw values) are read once, for the change and for a spectral head
    wants_bands = spectral is not None or (runner is not None and runner.spectral)
    for k in range(0, len(tiles), batch_size):
        batch = tiles[k:k + batch_size]
        boxes = [t.box for t in batch]
        feats, valids, raw = read_batch(extractor, readers, spectral_readers if wants_bands else None, batch,
                                        cache_dir)
        bands = None if raw is None else [torch.from_numpy(b.astype(np.float32)) for b in raw]
        # linear heads at patch resolution, then upsampled: equal to the heads of upsampled features
        size = (tile_size, tile_size)
        deep = [extractor.deepest(f) for f in feats]
        if cube is not None:
            cube(batch, extractor.patch_grid(deep[0]), valids[0])
        per_date = [torch.nn.functional.interpolate(heads.project(f), size=size, mode="bilinear",
                                                    align_corners=False) for f in deep]
        logits = runner.logits([extractor.main(f) for f in feats], size, bands) if runner is not None else []
        if runner is not None and not runner.change:
            per_date = [torch.cat([p, lg], dim=1) for p, lg in zip(per_date, logits, strict=True)]
        chans = list(per_date)
        if layout.has_change:
            chans.append(extractor.change_distance(feats[0], feats[1], size))
            if spectral is not None and bands is not None:
                chans.append(spectral.score(bands[0], bands[1]))
            else:
                chans.append(torch.zeros_like(chans[-1]))
        if runner is not None and runner.change:
            chans.append(logits[0])
        values = torch.cat(chans, dim=1).cpu().numpy()
        # a pixel counts only where it is valid on every date (padding outside the raster, nodata, masks):
        # an output pixel with no weight is nodata, so validity needs no second read of the sources
        valid_all = np.logical_and.reduce(valids)
        for i, box in enumerate(boxes):
            w = hann * valid_all[i]
            acc.add(box.relative_to(out_origin), values[i], w)
        if on_batch is not None:
            on_batch(len(batch))
    return len(tiles)
