"""Pictures of a diffusion generation, for notebooks.

``Model.generate(..., return_trace=True)`` records, for every canvas position, the forward
pass that committed it (``commit_step``, 1-based, -1 = never committed) and the confidence
it was committed with (``commit_conf``). These helpers draw them:

* ``commit_heatmap``: the step at which each position was committed, one row per block.
* ``confidence_plot``: the confidence of each commit, coloured by its step.
* ``unfolding_grid``: the canvas text after each step.
* ``compare_plot``: NFE and wall time against agreement with a reference output.
* ``sharding_plot``: which devices hold which block of a (1-D or 2-D) jax array.

The trace plots take either the trace dict or the whole ``GenerateOutput`` (then the tokens
come from it too). Every plot draws into the Axes it is given (else into a new figure) and
returns its matplotlib Axes (``compare_plot``: the two panels). matplotlib is imported inside
the functions, so ``import dllm_jax`` never needs it (``pip install 'dllm-jax[notebook]'``
brings it).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

NEVER = -1          # commit_step of a position that was never committed
MASKED, EARLIER, NOW = 0, 1, 2   # cell states in ``unfolding_grid``
_MAX_CHARS = 6      # token text longer than this is cut in cell annotations
_MAX_LABELS = 4096  # unfolding_grid writes tokens only up to this many cells (text is slow)


def _row_trace(trace, row: int, tokens=None):
    """(commit_step [G] int, commit_conf [G] float, tokens [G] or None) of one row."""
    if hasattr(trace, "trace"):  # a GenerateOutput
        if trace.trace is None:
            raise ValueError("this GenerateOutput has no trace; call generate(..., return_trace=True)")
        tokens = trace.tokens if tokens is None else tokens
        trace = trace.trace
    steps = np.asarray(trace["commit_step"])
    conf = np.asarray(trace["commit_conf"], np.float64)
    if steps.ndim == 1:
        steps, conf = steps[None], conf[None]
    if not -steps.shape[0] <= row < steps.shape[0]:
        raise IndexError(f"row={row} out of range for a trace of {steps.shape[0]} rows")
    if tokens is not None:
        tokens = np.asarray(tokens)
        tokens = tokens[row] if tokens.ndim == 2 else tokens
        if tokens.shape != steps[row].shape:
            raise ValueError(f"tokens of shape {tokens.shape} do not match the trace's canvas {steps[row].shape}")
    return steps[row].astype(np.int64), conf[row], tokens


def _grid_shape(g: int, block_length: int | None) -> tuple[int, int]:
    width = g if block_length is None else int(block_length)
    if width < 1 or g % width:
        raise ValueError(f"block_length={block_length} must divide the canvas length {g}")
    return g // width, width


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def token_text(tokenizer, token_id: int, max_chars: int = _MAX_CHARS) -> str:
    """A short, drawable label for one token: newlines/tabs shown as symbols, '$' escaped
    (matplotlib would read it as mathtext), cut to ``max_chars``."""
    text = tokenizer.decode([int(token_id)]) if tokenizer is not None else str(int(token_id))
    text = text.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "")
    text = "".join(ch if ch.isprintable() else "�" for ch in text)
    if text.strip() == "":
        text = "␣" if text else "∅"
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text.replace("$", r"\$")


def commit_heatmap(trace, row: int = 0, ax=None, tokens=None, tokenizer=None, *,
                   block_length: int | None = None, annotate: bool = True, cmap: str = "viridis"):
    """Heat map of the forward pass (step) that committed each canvas position.

    The canvas is drawn as a grid with one row per block (``block_length`` positions each),
    so the left-to-right block order reads top to bottom. Positions never committed
    (``commit_step == -1``, e.g. after an early stop) are masked and drawn grey.

    Args:
      trace: ``out.trace`` of ``generate(..., return_trace=True)``, or ``out`` itself.
      row: which prompt of the batch.
      ax: matplotlib Axes to draw into (default: a new figure).
      tokens: [B, G] or [G] canvas tokens, to write each token into its cell (taken from
        ``out`` when ``trace`` is a GenerateOutput).
      tokenizer: decodes ``tokens`` for the annotations (else token ids are written).
      block_length: the ``block_length`` of the generation; None = the canvas is one row.
      annotate: write the step number (and above it the token, when tokens are known) in
        each cell; "·" where never committed.
      cmap: matplotlib colormap name for the step.

    Returns:
      The Axes; ``ax.images[0].get_array()`` is the [num_blocks, block_length] masked array
      of commit steps.
    """
    import matplotlib.pyplot as plt

    steps, _, tokens = _row_trace(trace, row, tokens)
    rows, width = _grid_shape(steps.size, block_length)
    grid = np.ma.masked_equal(steps.reshape(rows, width), NEVER)
    if ax is None:
        _, ax = plt.subplots(figsize=(min(max(6.0, 0.55 * width + 1.5), 18.0), 0.5 * rows + 1.4),
                             layout="constrained")
    colormap = plt.get_cmap(cmap).with_extremes(bad="0.85")
    vmax = max(int(steps.max()), 1)
    image = ax.imshow(grid, cmap=colormap, vmin=1, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="committed at step", pad=0.01, ticks=_integer_ticks())
    ax.set_yticks(range(rows), [f"block {b}" for b in range(rows)])
    ax.set_xticks(range(0, width, max(1, width // 16)))
    ax.set_xlabel("position in block" if rows > 1 else "canvas position")
    for b in range(1, rows):  # block boundaries
        ax.axhline(b - 0.5, color="white", linewidth=2)
    if annotate:
        fontsize = max(4.0, min(9.0, 120.0 / width))
        for (r, c), step in np.ndenumerate(steps.reshape(rows, width)):
            pos = r * width + c
            if step == NEVER:
                label = "·"
            elif tokens is not None:  # the token, and the step under it
                label = f"{token_text(tokenizer, tokens[pos])}\n{step}"
            else:
                label = str(step)
            light = step == NEVER or (step - 1) / max(vmax - 1, 1) > 0.6
            ax.text(c, r, label, ha="center", va="center", fontsize=fontsize,
                    color="black" if light else "white")
    ax.set_title("step at which each position was committed" + (" (grey: never)" if grid.mask.any() else ""))
    return ax


def confidence_plot(trace, row: int = 0, ax=None, *, block_length: int | None = None,
                    threshold: float | None = None, cmap: str = "viridis"):
    """Bar chart of the confidence each canvas position was committed with.

    Bars are coloured by the step that committed them (the colours of ``commit_heatmap``);
    positions never committed get no bar and an ``x`` on the axis.

    Args:
      trace: ``out.trace`` or the GenerateOutput.
      row: which prompt of the batch.
      ax: Axes to draw into (default: a new figure).
      block_length: draw dashed lines at block boundaries.
      threshold: draw the threshold rule's line.
      cmap: colormap name for the step.

    Returns:
      The Axes; its bars (``ax.patches``) are in canvas order, height 0 where never committed.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    steps, conf, _ = _row_trace(trace, row)
    g = steps.size
    committed = steps != NEVER
    heights = np.where(committed, conf, 0.0)
    if ax is None:
        _, ax = plt.subplots(figsize=(min(max(6.0, 0.18 * g + 2.0), 18.0), 3.0), layout="constrained")
    norm = Normalize(vmin=1, vmax=max(int(steps.max()), 1))
    colormap = plt.get_cmap(cmap)
    ax.bar(np.arange(g), heights, width=0.85, color=colormap(norm(np.maximum(steps, 1))))
    if (~committed).any():
        ax.plot(np.flatnonzero(~committed), np.zeros(int((~committed).sum())), "x", color="0.4",
                label="never committed")
        ax.legend(loc="upper right", fontsize=8)
    if block_length is not None:
        _grid_shape(g, block_length)
        for edge in range(block_length, g, block_length):
            ax.axvline(edge - 0.5, color="0.5", linestyle="--", linewidth=0.8)
    if threshold is not None:
        ax.axhline(threshold, color="crimson", linewidth=1, label=f"threshold {threshold:g}")
        ax.legend(loc="upper right", fontsize=8)
    mappable = plt.cm.ScalarMappable(norm=norm, cmap=colormap)
    ax.figure.colorbar(mappable, ax=ax, label="committed at step", pad=0.01, ticks=_integer_ticks())
    ax.set_xlim(-0.5, g - 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("canvas position")
    ax.set_ylabel("confidence at commit")
    ax.set_title("confidence of each commit")
    return ax


def unfolding_states(commit_step) -> np.ndarray:
    """[S, G] cell states of one row's canvas after each step 1..S (S = last commit step):
    MASKED (0) still masked, EARLIER (1) committed at an earlier step, NOW (2) committed at it."""
    steps = np.asarray(commit_step, np.int64)
    last = max(int(steps.max()), 1)
    s = np.arange(1, last + 1)[:, None]
    done = (steps[None] != NEVER) & (steps[None] <= s)
    return np.where(done & (steps[None] == s), NOW, np.where(done, EARLIER, MASKED))


def unfolding_grid(trace, tokens=None, tokenizer=None, row: int = 0, ax=None, *, max_steps: int | None = None,
                   annotate: bool | None = None):
    """The canvas after each step: one row per forward pass, one column per position.

    Cells committed at that step are highlighted, earlier commits are pale, masked positions
    grey; committed cells show their token.

    Args:
      trace: ``out.trace`` or the GenerateOutput.
      tokens: [B, G] or [G] canvas tokens (taken from ``out`` when it is given).
      tokenizer: decodes the tokens (else ids are written).
      row: which prompt of the batch.
      ax: Axes to draw into (default: a new figure).
      max_steps: draw only the first steps.
      annotate: write the tokens into the cells; default: when there are tokens and at most
        4096 cells (drawing text is slow; a 256 x 256 canvas is 65536 cells).

    Returns:
      The Axes; ``ax.images[0].get_array()`` is ``unfolding_states`` (cut at ``max_steps``).
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    steps, _, tokens = _row_trace(trace, row, tokens)
    states = unfolding_states(steps)
    if max_steps is not None:
        states = states[:max_steps]
    s, g = states.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(min(max(6.0, 0.42 * g + 1.0), 20.0), min(0.3 * s + 1.2, 30.0)),
                             layout="constrained")
    colors = ListedColormap(["0.88", "#cfe3f5", "#f5b041"])
    ax.imshow(states, cmap=colors, vmin=0, vmax=2, aspect="auto", interpolation="nearest")
    fontsize = max(3.5, min(8.0, 260.0 / g))
    if annotate is None:
        annotate = tokens is not None and states.size <= _MAX_LABELS
    if annotate and tokens is not None:
        labels = [token_text(tokenizer, t) for t in tokens]
        for (r, c), state in np.ndenumerate(states):
            if state != MASKED:
                ax.text(c, r, labels[c], ha="center", va="center", fontsize=fontsize)
    ax.set_yticks(range(0, s, max(1, s // 20)), [str(i + 1) for i in range(0, s, max(1, s // 20))])
    ax.set_ylabel("after step")
    ax.set_xlabel("canvas position")
    ax.set_title("canvas as it unfolds (orange: committed at this step, grey: still masked)")
    return ax


def compare_plot(results: Sequence[Mapping], axes=None, *, connect: bool = True):
    """NFE and wall time against agreement with a reference, one point per run.

    Args:
      results: one mapping per run with ``agreement`` (fraction of tokens equal to the
        reference, 0..1), ``nfe`` and ``seconds``; optional ``group`` (runs of a group are
        joined by a line in the given order, e.g. a threshold sweep, and share a legend entry)
        and ``label`` (written next to the point, e.g. the threshold).
      axes: two Axes (NFE, seconds) to draw into (default: a new figure with two panels).
        Calling again with the returned Axes adds to the same panels.
      connect: join the runs of a group by a line (False: markers only, e.g. for runs
        that are not a sweep).

    Returns:
      The two Axes (NFE panel, time panel).
    """
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("compare_plot needs at least one result")
    for r in results:
        missing = {"agreement", "nfe", "seconds"} - set(r)
        if missing:
            raise KeyError(f"result {dict(r)} lacks {sorted(missing)}")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    ax_nfe, ax_time = axes
    groups: dict[str, list[Mapping]] = {}
    for r in results:
        groups.setdefault(str(r.get("group", "")), []).append(r)
    for name, runs in groups.items():
        x = [float(r["agreement"]) for r in runs]
        for ax, key in ((ax_nfe, "nfe"), (ax_time, "seconds")):
            y = [float(r[key]) for r in runs]
            (line,) = ax.plot(x, y, "o-" if connect and len(runs) > 1 else "o", label=name or None)
            for xi, yi, r in zip(x, y, runs):
                if r.get("label") is not None:
                    ax.annotate(str(r["label"]), (xi, yi), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=line.get_color())
    for ax, ylabel in ((ax_nfe, "NFE (forward passes)"), (ax_time, "wall time per call (s)")):
        ax.set_xlabel("agreement with reference (fraction of equal tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(x=0.1, y=0.12)
        ax.set_ylim(bottom=0)
    if any(line.get_label() and not line.get_label().startswith("_") for line in ax_nfe.lines):
        ax_nfe.legend(fontsize=8)
    return ax_nfe, ax_time


def sharding_plot(array, ax=None, *, title: str | None = None, cmap: str = "tab20"):
    """Which devices hold which block of a 1-D or 2-D jax array (a picture of its sharding).

    Each distinct block of the array is a rectangle labelled with the ids of the devices
    holding it (several ids = replicas), like ``jax.debug.visualize_array_sharding`` but as a
    matplotlib figure.

    Args:
      array: a ``jax.Array`` with a sharding (e.g. ``m.params["lm_head"].get_value()``).
      ax: Axes to draw into (default: a new figure).
      title: default: the shape and the PartitionSpec.
      cmap: colormap name for the blocks.

    Returns:
      The Axes; ``ax.patches`` holds one rectangle per distinct block (row-major order) and
      ``ax.texts`` their device labels ("dev 0,2,4,6").
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shape = tuple(array.shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"sharding_plot draws 1-D or 2-D arrays; got shape {shape} (index it down first)")
    grid = shape if len(shape) == 2 else (1, shape[0])
    blocks: dict[tuple[int, int, int, int], list[int]] = {}
    for device, index in array.sharding.devices_indices_map(shape).items():
        index = tuple(index) if len(shape) == 2 else (slice(None),) + tuple(index)
        (r0, r1, _), (c0, c1, _) = (sl.indices(n) for sl, n in zip(index, grid))
        blocks.setdefault((r0, r1, c0, c1), []).append(device.id)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3), layout="constrained")
    colors = plt.get_cmap(cmap)
    for i, ((r0, r1, c0, c1), ids) in enumerate(sorted(blocks.items())):
        ax.add_patch(Rectangle((c0, r0), c1 - c0, r1 - r0, facecolor=colors(i % colors.N), edgecolor="white",
                               linewidth=2))
        ax.text((c0 + c1) / 2, (r0 + r1) / 2, "dev " + ",".join(map(str, sorted(ids))), ha="center",
                va="center", fontsize=8)
    ax.set_xlim(0, grid[1])
    ax.set_ylim(grid[0], 0)  # row 0 on top, like a matrix
    ax.set_xlabel(f"axis {len(shape) - 1} ({grid[1]})")
    ax.set_ylabel("axis 0 ({})".format(grid[0]) if len(shape) == 2 else "")
    spec = getattr(array.sharding, "spec", None)
    ax.set_title(title if title is not None else f"{shape} {spec if spec is not None else array.sharding}")
    return ax
