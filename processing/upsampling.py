"""Bilinear upsampling on an explicit sampling grid, by bands of target rows or at chosen pixels.

The grid is that of ``F.interpolate(mode="bilinear", align_corners=False)``, with the scale taken from an image's
valid extent (which may end inside the last row or column of the cropped mask logits). Three ways to evaluate it:

- `upsample_rows`: a band of target rows, separable (PyTorch's linear kernel along the columns, then one `lerp` per
  source row over the target rows it covers), the dense path;
- `sample_bilinear`: arbitrary target pixels, four samples per map and pixel, the one-by-one path;
- `cell_bounds`: the min and max of each 2x2 cell of source samples, which bound every target pixel of the cell.

`row_tiles` cuts a target into bands whose tensors stay within a budget of values, so memory does not grow with the
target size. `decision.py` builds the post-processing decision on these.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Values (maps x target pixels) of one tile's tensors: the cell bounds and one-by-one samples of a tile.
TILE_ELEMENTS = 1 << 23
# Values per dense upsampling step: small enough to stay in cache, where element-wise work runs several times faster.
DENSE_ELEMENTS = 1 << 20


# --------------------------------------------------------------------------------------------------------------------
# The sampling grid of F.interpolate(mode="bilinear", align_corners=False)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class BilinearGrid:
    """For each target row (column): the first source row (column) it reads and the weight of the next one.

    `source_rows (H,)`, `row_weights (H,)`, `source_cols (W,)`, `col_weights (W,)` live on the maps' device;
    `next_cols (W,)` is `source_cols + 1` clamped to the last column. `row_starts` (host list of `h + 1` ints): the
    first target row whose top sample is each source row (non-decreasing, ends with `H`). `col_counts (w,)`: target
    columns whose left sample is each source column. `column_scale`: target columns per source column (`W` over the
    valid width).
    """

    source_rows: torch.Tensor
    row_weights: torch.Tensor
    source_cols: torch.Tensor
    col_weights: torch.Tensor
    next_cols: torch.Tensor
    col_counts: torch.Tensor
    row_starts: list[int]
    source_size: tuple[int, int]
    column_scale: float

    @property
    def target_size(self) -> tuple[int, int]:
        return (self.source_rows.numel(), self.source_cols.numel())

    def source_row(self, target_row: int) -> int:
        """The top source row that target row `target_row` reads."""
        return bisect.bisect_right(self.row_starts, target_row) - 1


def _axis(source_length: int, extent: float, target_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    # F.interpolate's source coordinate of an output pixel centre, with the scale taken from the valid extent (which
    # may end inside the last cropped row), clamped to the cropped samples.
    scale = extent / target_length
    coordinate = ((torch.arange(target_length, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    index = coordinate.floor().long().clamp(max=source_length - 1)
    weight = (coordinate - index).clamp(0, 1)
    return index, weight


def bilinear_grid(
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    extent: tuple[float, float] | None = None,
    device: torch.device | str = "cpu",
) -> BilinearGrid:
    """The sampling grid of a bilinear resize of `source_size` (whose valid part is `extent`) to `target_size`."""
    height, width = source_size
    extent = extent or source_size
    rows, row_weights = _axis(height, extent[0], target_size[0])
    cols, col_weights = _axis(width, extent[1], target_size[1])
    row_counts = torch.bincount(rows, minlength=height)  # (h,) target rows per source row
    row_starts = [0, *torch.cumsum(row_counts, 0).tolist()]
    return BilinearGrid(
        source_rows=rows.to(device),
        row_weights=row_weights.to(device),
        source_cols=cols.to(device),
        col_weights=col_weights.to(device),
        next_cols=(cols + 1).clamp(max=width - 1).to(device),
        col_counts=torch.bincount(cols, minlength=width).to(device),
        row_starts=row_starts,
        source_size=(height, width),
        column_scale=target_size[1] / extent[1],
    )


def row_tiles(grid: BilinearGrid, values_per_pixel: int, budget: int | None = None) -> Iterator[tuple[int, int]]:
    """Bands `[start, stop)` of target rows covering the target, each of about `budget` values (default
    `TILE_ELEMENTS`) at `values_per_pixel` per pixel, ending where a source row ends when one lies inside the band
    (so that neighbouring bands rarely share a cell row)."""
    height, width = grid.target_size
    rows_per_tile = max(1, (budget or TILE_ELEMENTS) // max(1, values_per_pixel * width))
    start = 0
    while start < height:
        stop = min(height, start + rows_per_tile)
        boundary = grid.row_starts[bisect.bisect_right(grid.row_starts, stop) - 1]
        if start < boundary < stop:
            stop = boundary
        yield start, stop
        start = stop


def column_pass(maps: torch.Tensor, grid: BilinearGrid, first: int, last: int) -> torch.Tensor:
    """Source rows `first..last + 1` (clamped) resized along the columns: `(N, h, w) -> (N, r, W)`.

    PyTorch's linear kernel with the grid's scale: the same sampling as `grid.source_cols`/`col_weights` (several
    times faster than gathering along the last dimension).
    """
    block = maps[:, first : min(last + 2, grid.source_size[0])]  # (N, h, w) -> (N, r, w)
    num_maps, rows, width = block.shape
    if block.numel() == 0:
        return block.new_empty(num_maps, rows, grid.target_size[1])
    resized = torch.ops.aten.upsample_linear1d(
        block.reshape(1, num_maps * rows, width), [grid.target_size[1]], False, grid.column_scale
    )  # (1, N*r, w) -> (1, N*r, W)
    return resized.view(num_maps, rows, -1)


def row_pass(columns: torch.Tensor, grid: BilinearGrid, first: int, start: int, stop: int) -> torch.Tensor:
    """Target rows `[start, stop)` from `columns (N, r, W)` (`column_pass` from source row `first`):
    `-> (N, stop - start, W)`. One `lerp` per source row over the target rows between it and the next, no gather."""
    height = grid.source_size[0]
    result = columns.new_empty(columns.shape[0], stop - start, columns.shape[2])
    for row in range(grid.source_row(start), grid.source_row(stop - 1) + 1):
        begin, end = max(grid.row_starts[row], start), min(grid.row_starts[row + 1], stop)
        if begin >= end:
            continue
        top, bottom = row - first, min(row + 1, height - 1) - first
        torch.lerp(
            columns[:, top : top + 1],
            columns[:, bottom : bottom + 1],
            grid.row_weights[begin:end, None],
            out=result[:, begin - start : end - start],
        )
    return result


def upsample_rows(maps: torch.Tensor, grid: BilinearGrid, start: int, stop: int) -> torch.Tensor:
    """Target rows `[start, stop)` of the bilinear resize of `maps` on `grid`: `(N, h, w) -> (N, stop - start, W)`.

    Separable, columns first as PyTorch's bilinear kernel (`column_pass`, then `row_pass`).
    """
    first, last = grid.source_row(start), grid.source_row(stop - 1)
    return row_pass(column_pass(maps, grid, first, last), grid, first, start, stop)


def upsample_bilinear(maps: torch.Tensor, grid: BilinearGrid) -> torch.Tensor:
    """Dense bilinear resize on `grid`: `(N, h, w) -> (N, H, W)`; equals F.interpolate when the extent is whole."""
    return upsample_rows(maps, grid, 0, grid.target_size[0])


def sample_bilinear(maps: torch.Tensor, grid: BilinearGrid, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Values of the bilinear resize of `maps (N, h, w)` at target pixels `(rows, cols)` `(M,)`: `-> (N, M)`.

    The same arithmetic as `upsample_rows` (columns first), so both give the same values.
    """
    height, width = grid.source_size
    top, row_weight = grid.source_rows[rows], grid.row_weights[rows]
    left, right, col_weight = grid.source_cols[cols], grid.next_cols[cols], grid.col_weights[cols]
    bottom = (top + 1).clamp(max=height - 1)
    flat = maps.flatten(1)  # (N, h, w) -> (N, h*w)

    def corner(row_index: torch.Tensor, col_index: torch.Tensor) -> torch.Tensor:
        return flat.index_select(1, row_index * width + col_index)  # (N, h*w) -> (N, M)

    upper = torch.lerp(corner(top, left), corner(top, right), col_weight)
    lower = torch.lerp(corner(bottom, left), corner(bottom, right), col_weight)
    return torch.lerp(upper, lower, row_weight)


def cell_bounds(maps: torch.Tensor, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the 2x2 cells of source rows `first..last`: `(N, h, w) -> 2 x (N, last - first + 1, w)`.

    The sampling clamps at the last row and column, so there a cell repeats them.
    """
    height = maps.shape[1]
    block = maps[:, first : min(last + 2, height)]  # the cells' rows and the next one
    num_rows = last - first + 1
    bounds = []
    for reduce in (torch.minimum, torch.maximum):
        # (N, r + 1, w) -> (N, r, w): each row with the next, the last row alone where it has none
        vertical = maps.new_empty(maps.shape[0], num_rows, maps.shape[2])
        paired = block.shape[1] - 1
        reduce(block[:, :-1], block[:, 1:], out=vertical[:, :paired])
        if paired < num_rows:
            vertical[:, paired:] = block[:, paired:]
        # then each column with the next, the last column alone
        bound = torch.empty_like(vertical)
        reduce(vertical[:, :, :-1], vertical[:, :, 1:], out=bound[:, :, :-1])
        bound[:, :, -1] = vertical[:, :, -1]
        bounds.append(bound)
    return bounds[0], bounds[1]


# Reductions of bool tensors over a leading dimension run one to two orders of magnitude slower on CPU than the same
# reductions of their bytes read as uint8; these helpers reduce the bytes.


def any_along(flags: torch.Tensor, dim: int) -> torch.Tensor:
    """`flags.any(dim)` of a bool tensor."""
    return flags.view(torch.uint8).amax(dim).bool()


def all_along(flags: torch.Tensor, dim: int) -> torch.Tensor:
    """`flags.all(dim)` of a bool tensor."""
    return flags.view(torch.uint8).amin(dim).bool()


def count_along(flags: torch.Tensor, dim: int) -> torch.Tensor:
    """`flags.sum(dim)` of a bool tensor, in the smallest integer type that cannot overflow."""
    dtype = torch.uint8 if flags.shape[dim] < 256 else torch.int32
    return flags.view(torch.uint8).sum(dim, dtype=dtype)


def first_true(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True along dim 0: `(C, M) bool -> (M,)` long, `C` where none is."""
    count = flags.shape[0]
    dtype = torch.uint8 if count < 256 else torch.int16 if count < 32768 else torch.int32
    descending = torch.arange(count, 0, -1, dtype=dtype, device=flags.device)[:, None]  # (C, 1)
    return count - (flags * descending).amax(0).long()


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(0)` for `(C, M)`: the first index of the maximum (amax and a compare run ~5x faster on CPU than
    argmax over a leading dimension)."""
    return first_true(scores == scores.amax(0)).clamp_(max=scores.shape[0] - 1)  # NaN columns: the last index
