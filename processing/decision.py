"""Which upsampled map (or class) wins each target pixel: exact, and decided per 2x2 cell wherever possible.

Post-processing asks, for every pixel of a target size, which of `N` low-resolution maps (mask logits) wins once
they are upsampled bilinearly: the largest value, the largest ``weight x sigmoid(value)`` (panoptic and instance
inference) or the largest mixture ``sum_n p(class | n) x sigmoid(value_n)`` over classes (semantic inference), and
whether the winner passes a threshold.

Every target pixel is a convex combination of the 2x2 low-resolution samples around it (a cell), so the cell's
minimum and maximum bound all of its pixels, and the scores above are increasing in each value. Where the bounds
settle the decision (one map wins by a margin, every threshold test is unanimous) the whole cell is decided at once.
The other pixels are evaluated exactly: one by one where they are few, or by a dense upsampling of the tile's rows
where they are more than `DENSE_SHARE` of its pixels (per-pixel noise, untrained models), which costs less per
pixel. Either way the result is that of upsampling every map densely and deciding per pixel, up to float rounding at
exact ties. The target is processed in bands of rows (`upsampling.row_tiles`), so memory beyond the `(H, W)` result
stays bounded whatever the target size.

Semantic inference has two more shortcuts, both exact. Queries whose every class probability is small (no-object
queries) enter as per-tile bounds on their contribution rather than per pixel, and classes no query gives much
probability are bounded together; the few pixels whose decision those bounds leave open are scored again with every
query and class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import upsampling
from .upsampling import (
    BilinearGrid,
    all_along,
    any_along,
    cell_bounds,
    column_pass,
    count_along,
    first_argmax,
    first_true,
    row_pass,
    row_tiles,
    sample_bilinear,
)

# Above this share of undecided pixels a tile is upsampled densely: evaluating a pixel one by one (four gathers per
# map) costs about 1 / DENSE_SHARE times a pixel of the dense path (measured with bench/processing.py).
DENSE_SHARE = 0.3
# Semantic: classes that some query gives at least this share of the largest class probability of any query are
# scored one by one, the others are bounded together; queries whose largest class probability is below this share
# are bounded per tile.
MAIN_SHARE = 0.1
# Semantic: in a dense tile where the weak queries' bounds leave more than this (in probability) open for some class,
# the weak maps are upsampled with the strong ones (noise-like masks), rather than evaluated one by one where open.
LOOSE_WEAK_BOUNDS = 0.01

# Maps target-pixel indices of a set of evaluated pixels to their (rows, cols).
Locate = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Cells:
    """The cell stage of one tile, for `C` cells: `certain (C,)` (decided for all of the cell's pixels), `winner
    (C,)` (the winner where certain), `contenders (R, C)` (which rows, maps or the main classes, may win a pixel of
    the cell)."""

    certain: torch.Tensor
    winner: torch.Tensor
    contenders: torch.Tensor


class _MapScoring:
    """Winners are maps: of the values themselves, or of `weights (N,) x sigmoid(values)`."""

    def __init__(self, maps: torch.Tensor, weights: torch.Tensor | None) -> None:
        self.maps, self.weights = maps, weights
        self.num_strong = self.num_rows = maps.shape[0]  # every map is evaluated per pixel
        self.rows = None  # contenders' rows are the maps themselves

    def begin_tile(self, first: int, last: int) -> None:
        pass

    def loose(self) -> bool:
        return False

    def _scores(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.weights is None else self.weights[:, None] * values.sigmoid()  # (N, M)

    def cells(self, lower: torch.Tensor, upper: torch.Tensor) -> _Cells:
        best_lower = self._scores(lower).amax(0)  # (N, C) -> (C,)
        contenders = self._scores(upper) >= best_lower  # (N, C)
        certain = count_along(contenders, 0) == 1  # only the best lower bound's owner can win
        return _Cells(certain, first_true(contenders).clamp_(max=self.num_rows - 1), contenders)

    def pixels(self, values: torch.Tensor, rows: torch.Tensor | None, locate: Locate) -> torch.Tensor:
        return first_argmax(self._scores(values))  # (N, M) -> (M,)


class _ClassScoring:
    """Winners are classes `k` of `sum_n class_weights[n, k] x sigmoid(value_n)` (non-negative weights).

    Queries are reordered strong first: a query is weak when its largest class probability is below `MAIN_SHARE` of
    the largest of any query. A weak query's contribution to class `k` anywhere in a tile lies between
    `class_weights[n, k] x sigmoid(min)` and `class_weights[n, k] x sigmoid(max)` of its map over the tile's rows, so
    only the strong maps are bounded per cell and evaluated per pixel (all maps are, in dense tiles where these bounds
    are looser than `LOOSE_WEAK_BOUNDS`). A class is main when some query gives it at least `MAIN_SHARE` of the
    largest class probability; every other class scores at most the rest ceiling `rest_weights @ sigmoid(values)`,
    `rest_weights (N,)` being each query's largest probability among them. Pixels where these bounds leave the winner
    open are scored again with every query and class.
    """

    def __init__(self, maps: torch.Tensor, grid: BilinearGrid, class_weights: torch.Tensor) -> None:
        self.grid = grid
        per_query = class_weights.amax(1)  # (N,)
        strong = per_query >= MAIN_SHARE * per_query.max()
        order = torch.cat([strong.nonzero()[:, 0], (~strong).nonzero()[:, 0]])
        self.maps, self.class_weights = maps[order].contiguous(), class_weights[order]  # (N, h, w), (N, K)
        self.num_strong = int(strong.sum())
        per_class = class_weights.amax(0)  # (K,)
        main = per_class >= MAIN_SHARE * per_class.max()
        self.rows = main.nonzero()[:, 0]  # (R,) the main classes, the rows of contenders
        self.num_rows = self.rows.numel()
        self.rest_weights = None if bool(main.all()) else self.class_weights.masked_fill(main, 0).amax(1)  # (N,)
        weak = self.maps[self.num_strong :]
        self.weak_row_min, self.weak_row_max = weak.amin(2), weak.amax(2)  # (N_weak, h) each
        self.weak = None  # this tile's bounds on the weak queries' part: low (K,), high (K,), rest ceiling

    def begin_tile(self, first: int, last: int) -> None:
        """Bounds of the weak queries' contributions over source rows `first..last + 1`."""
        if self.num_strong == self.maps.shape[0]:
            return
        rows = slice(first, last + 2)
        low = self.weak_row_min[:, rows].amin(1).sigmoid()  # (N_weak,)
        high = self.weak_row_max[:, rows].amax(1).sigmoid()
        weak_weights = self.class_weights[self.num_strong :]  # (N_weak, K)
        rest = None if self.rest_weights is None else self.rest_weights[self.num_strong :] @ high
        self.weak = (weak_weights.T @ low, weak_weights.T @ high, rest)

    def loose(self) -> bool:
        """Whether this tile's weak bounds are too loose to leave the weak maps out of a dense pass."""
        return self.weak is not None and float((self.weak[1] - self.weak[0]).max()) > LOOSE_WEAK_BOUNDS

    def _scores(self, probabilities: torch.Tensor, classes: torch.Tensor, bound: int | None) -> torch.Tensor:
        """`(N', M)` probabilities of the first `N'` queries -> `(K', M)` scores of `classes`, plus the weak bound
        (0 low, 1 high) when those are the strong queries only."""
        count = probabilities.shape[0]
        scores = self.class_weights[:count, classes].T @ probabilities  # (K', N') @ (N', M); increasing in each value
        if bound is not None and count < self.maps.shape[0] and self.weak is not None:
            scores += self.weak[bound][classes, None]
        return scores

    def _rest_ceiling(self, probabilities: torch.Tensor) -> torch.Tensor | None:
        if self.rest_weights is None:
            return None
        count = probabilities.shape[0]
        ceiling = self.rest_weights[:count] @ probabilities  # (N',) @ (N', M) -> (M,)
        return ceiling + self.weak[2] if count < self.maps.shape[0] and self.weak is not None else ceiling

    def cells(self, lower: torch.Tensor, upper: torch.Tensor) -> _Cells:
        best_lower = self._scores(lower.sigmoid(), self.rows, 0).amax(0)  # (R, C) -> (C,)
        upper_probabilities = upper.sigmoid()
        contenders = self._scores(upper_probabilities, self.rows, 1) >= best_lower  # (R, C)
        certain = count_along(contenders, 0) == 1
        rest_ceiling = self._rest_ceiling(upper_probabilities)
        if rest_ceiling is not None:
            certain &= rest_ceiling < best_lower
        winner = self.rows[first_true(contenders).clamp_(max=self.num_rows - 1)]
        return _Cells(certain, winner, contenders)

    def pixels(self, values: torch.Tensor, rows: torch.Tensor | None, locate: Locate) -> torch.Tensor:
        """Winning classes of pixels with values `(N', M)` of the strong (or all) queries, among `rows` (indices
        into the main classes: those that may win there)."""
        classes = self.rows if rows is None else self.rows[rows]
        bounded = values.shape[0] < self.maps.shape[0] and self.weak is not None
        if not bounded and self.rest_weights is None and classes.numel() == 1:
            return classes.expand(values.shape[1])
        probabilities = values.sigmoid()
        low = self._scores(probabilities, classes, 0)  # (K', M)
        best = low.amax(0)
        winner = first_true(low == best).clamp_(max=classes.numel() - 1)  # (M,)
        open_ = None
        if bounded:
            rivals = self._scores(probabilities, classes, 1).scatter_(0, winner[None], -torch.inf)
            open_ = rivals.amax(0) >= best
        rest_ceiling = self._rest_ceiling(probabilities)
        if rest_ceiling is not None:
            open_ = rest_ceiling >= best if open_ is None else open_ | (rest_ceiling >= best)
        winner = classes[winner]
        if open_ is not None:
            pending = open_.nonzero()[:, 0]
            if pending.numel():
                winner[pending] = self._every_class(values[:, pending], *locate(pending))
        return winner

    def _every_class(self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Exact winners over every query and class at target pixels `(rows, cols)`, `values (N', D)` given."""
        if values.shape[0] < self.maps.shape[0]:
            weak_values = sample_bilinear(self.maps[values.shape[0] :], self.grid, rows, cols)  # (N - N', D)
            values = torch.cat([values, weak_values])
        return first_argmax(self.class_weights.T @ values.sigmoid())  # (K, N) @ (N, D) -> (K, D) -> (D,)


@dataclass
class _Tile:
    """One tile's codes: per cell `cell_codes (r, w)` for rows `[start, stop)` (expanded through `tile_rows`) and the
    evaluated pixels' `codes (M,)` at `(rows, cols)`; or, for a dense tile, `codes (stop - start, W)` alone."""

    start: int
    stop: int
    codes: torch.Tensor
    cell_codes: torch.Tensor | None = None
    tile_rows: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None


@dataclass
class UpsampledDecision:
    """The winner of every target pixel among `N` upsampled maps (or `K` classes), kept per tile: per cell where the
    cell was decided, per pixel elsewhere (`render` writes the `(H, W)` map).

    Args:
        grid: the sampling grid.
        tiles: the codes of each tile: the winning map (class); with a threshold, `N` where the winner's own logit
            misses it.
        won: `(N,)` target pixels won by each map, covered or not (with a threshold, else None).
        won_covered: `(N,)` target pixels won by each map where its logit passes the threshold.
        covered_area: `(N,)` target pixels where each map's logit passes the threshold, whether it wins or not.
        evaluated_pixels: target pixels evaluated one by one (the rest were decided per cell or densely).
        dense_pixels: target pixels of tiles that were upsampled densely.
    """

    grid: BilinearGrid
    tiles: list[_Tile]
    won: torch.Tensor | None
    won_covered: torch.Tensor | None
    covered_area: torch.Tensor | None
    evaluated_pixels: int
    dense_pixels: int

    def areas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(N,)` target pixels won by each map, and won and covered."""
        return self.won, self.won_covered

    def render(self, lookup: torch.Tensor, fill: int) -> torch.Tensor:
        """`(H, W)` map of `lookup[winner]` where covered, `fill` elsewhere; `lookup (N,)`, its dtype kept."""
        table = torch.cat([lookup, lookup.new_full((1,), fill)])  # (N + 1,): the uncovered code N gives `fill`
        result = lookup.new_empty(self.grid.target_size)
        for tile in self.tiles:
            if tile.cell_codes is None:
                result[tile.start : tile.stop] = table[tile.codes]
                continue
            result[tile.start : tile.stop] = _expand(table[tile.cell_codes], self.grid, tile.tile_rows)
            if tile.rows is not None:
                result.index_put_((tile.rows, tile.cols), table[tile.codes])
        return result


class _Threshold:
    """Whether each pixel's winning map passes `logit_threshold`, and the pixel counts of `UpsampledDecision`
    accumulated over tiles (long, exact at any target size)."""

    def __init__(self, logit_threshold: float, num_maps: int, device: torch.device) -> None:
        self.logit_threshold, self.num_maps = logit_threshold, num_maps
        self.won = torch.zeros(num_maps, dtype=torch.long, device=device)
        self.won_covered = torch.zeros_like(self.won)
        self.covered_area = torch.zeros_like(self.won)

    def settle(self, lower: torch.Tensor, upper: torch.Tensor, cells: _Cells) -> None:
        """Cells where some map's threshold test is not unanimous become uncertain."""
        self.inside = lower >= self.logit_threshold  # (N, C)
        cells.certain &= all_along(self.inside | (upper < self.logit_threshold), 0)

    def cell_codes(self, cells: _Cells, pixels: torch.Tensor) -> torch.Tensor:
        """Codes of the cells (`N` where the winner misses the threshold); counts the certain cells' `pixels (C,)`."""
        covered = self.inside.gather(0, cells.winner[None])[0]
        decided = pixels * cells.certain
        self.won.index_add_(0, cells.winner, decided)
        self.won_covered.index_add_(0, cells.winner, decided * covered)
        # (N, C) @ (C,): integer sums below 2^24 are exact in float32, and a tile holds fewer pixels
        self.covered_area += (self.inside.float() @ decided.float()).round().long()
        return torch.where(covered, cells.winner, self.num_maps)

    def pixels(self, values: torch.Tensor, winner: torch.Tensor) -> torch.Tensor:
        """Codes of evaluated pixels, `values (N, M)` and `winner (M,)`; counts them."""
        inside = values >= self.logit_threshold  # (N, M)
        covered = inside.gather(0, winner[None])[0]
        both = torch.bincount(winner + self.num_maps * covered, minlength=2 * self.num_maps)  # (2N,)
        self.won += both[: self.num_maps] + both[self.num_maps :]
        self.won_covered += both[self.num_maps :]
        self.covered_area += count_along(inside, 1)
        return torch.where(covered, winner, self.num_maps)


def _at(rows: torch.Tensor, cols: torch.Tensor) -> Locate:
    """Locates pixels given by their positions in `(rows, cols)`."""
    return lambda pixels: (rows[pixels], cols[pixels])


def _expand(cell_values: torch.Tensor, grid: BilinearGrid, tile_rows: torch.Tensor) -> torch.Tensor:
    """Every target pixel of a tile takes its cell's value: `(r, w) -> (len(tile_rows), W)`, columns first (the
    gather runs on the r source rows, the row pass copies whole rows)."""
    return cell_values.index_select(1, grid.source_cols).index_select(0, tile_rows)


def decide_upsampled(
    maps: torch.Tensor,
    grid: BilinearGrid,
    weights: torch.Tensor | None = None,
    logit_threshold: float | None = None,
    class_weights: torch.Tensor | None = None,
) -> UpsampledDecision:
    """Argmax over `maps (N, h, w)` upsampled on `grid`: of the values themselves, or with `weights (N,)` of
    `weights x sigmoid(value)` (mask logits weighted by query scores), or with `class_weights (N, K)` (non-negative)
    over the `K` mixtures `sum_n class_weights[n, k] x sigmoid(value_n)` (semantic inference; winners are classes).

    With `logit_threshold` (maps only), also whether the winner passes it, and the pixel counts of
    `UpsampledDecision`. Equal to upsampling the maps densely and deciding per pixel, up to float rounding at exact
    ties.
    """
    if class_weights is not None and (weights is not None or logit_threshold is not None):
        raise ValueError("`class_weights` decides among classes: it takes no `weights` or `logit_threshold`.")
    maps = maps.contiguous()  # a crop of the padded logits: sample_bilinear reads it flat
    scoring = _MapScoring(maps, weights) if class_weights is None else _ClassScoring(maps, grid, class_weights)
    strong_maps = scoring.maps[: scoring.num_strong]  # (N_strong, h, w): evaluated per pixel
    num_maps, _, width = maps.shape
    threshold = None if logit_threshold is None else _Threshold(logit_threshold, num_maps, maps.device)
    tiles = []
    target_width = grid.target_size[1]
    evaluated = dense = 0

    def decide_pixels(values: torch.Tensor, rows: torch.Tensor | None, locate: Locate) -> torch.Tensor:
        winner = scoring.pixels(values, rows, locate)
        return winner if threshold is None else threshold.pixels(values, winner)

    for start, stop in row_tiles(grid, scoring.num_strong + scoring.num_rows):
        first, last = grid.source_row(start), grid.source_row(stop - 1)
        scoring.begin_tile(first, last)
        lower, upper = (bound.flatten(1) for bound in cell_bounds(strong_maps, first, last))  # (N, C) each
        cells = scoring.cells(lower, upper)
        if threshold is not None:
            threshold.settle(lower, upper, cells)
        # (stop - start,) rows of the tile per cell row x (W,) columns per cell column -> (C,) target pixels per cell
        tile_rows = grid.source_rows[start:stop] - first
        cell_pixels = (torch.bincount(tile_rows, minlength=last - first + 1)[:, None] * grid.col_counts).flatten()
        undecided = int((cell_pixels * ~cells.certain).sum())
        if undecided > DENSE_SHARE * (stop - start) * target_width:
            # Dense: every pixel of the tile, also those of decided cells.
            rows = None if scoring.rows is None else any_along(cells.contenders, 1).nonzero()[:, 0]
            num_rows = scoring.num_rows if rows is None else rows.numel()
            step = max(1, upsampling.DENSE_ELEMENTS // ((scoring.maps.shape[0] + num_rows) * target_width))
            dense_maps = scoring.maps if scoring.loose() else strong_maps
            columns = column_pass(dense_maps, grid, first, last)  # (N', r, W)
            codes = torch.empty(stop - start, target_width, dtype=torch.long, device=maps.device)
            for begin in range(start, stop, step):
                end = min(begin + step, stop)
                values = row_pass(columns, grid, first, begin, end).flatten(1)  # (N, rows, W) -> (N, rows*W)

                def locate(pixels: torch.Tensor, begin: int = begin) -> tuple[torch.Tensor, torch.Tensor]:
                    return begin + pixels // target_width, pixels % target_width

                codes[begin - start : end - start] = decide_pixels(values, rows, locate).view(end - begin, -1)
            tiles.append(_Tile(start, stop, codes))
            dense += (stop - start) * target_width
            continue
        cell_codes = cells.winner if threshold is None else threshold.cell_codes(cells, cell_pixels)
        tile = _Tile(start, stop, cell_codes[:0], cell_codes.view(-1, width), tile_rows)
        if undecided:
            pending = _expand((~cells.certain).view(-1, width), grid, tile_rows)
            pixel_rows, pixel_cols = pending.nonzero(as_tuple=True)  # (M,) each, in tile coordinates
            pixel_rows += start
            rows = None
            if scoring.rows is not None:
                rows = any_along(cells.contenders & ~cells.certain, 1).nonzero()[:, 0]
            values = sample_bilinear(strong_maps, grid, pixel_rows, pixel_cols)  # (N_strong, M)
            tile.codes = decide_pixels(values, rows, _at(pixel_rows, pixel_cols))
            tile.rows, tile.cols = pixel_rows, pixel_cols
            evaluated += undecided
        tiles.append(tile)
    return UpsampledDecision(
        grid=grid,
        tiles=tiles,
        won=None if threshold is None else threshold.won,
        won_covered=None if threshold is None else threshold.won_covered,
        covered_area=None if threshold is None else threshold.covered_area,
        evaluated_pixels=evaluated,
        dense_pixels=dense,
    )
