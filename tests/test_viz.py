"""dllm_jax.viz: the pictures show the trace they are given (Agg backend, no display)."""

import subprocess
import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dllm_jax import viz  # noqa: E402
from dllm_jax.sampling import GenerateOutput  # noqa: E402

# two rows, G = 8, block_length 4; row 1 stopped early: its last block was never committed
STEPS = np.array([[3, 1, 2, 4, 5, 8, 6, 7],
                  [2, 1, 1, 3, -1, -1, -1, -1]], np.int32)
CONF = np.array([[0.5, 0.9, 0.7, 0.3, 0.6, 0.2, 0.8, 0.4],
                 [0.8, 0.95, 0.9, 0.5, 0.0, 0.0, 0.0, 0.0]], np.float32)
TRACE = {"commit_step": STEPS, "commit_conf": CONF}
TOKENS = np.array([[10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 9, 9, 9, 9]], np.int32)


class FakeTokenizer:
    def decode(self, ids):
        return {10: "a$b", 11: "\n", 12: " ", 13: "longtokenname"}.get(ids[0], f"t{ids[0]}")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_import_dllm_jax_does_not_import_matplotlib():
    code = "import sys, dllm_jax; dllm_jax.viz; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("row", [0, 1])
def test_commit_heatmap_shows_the_trace_block_per_row(row):
    ax = viz.commit_heatmap(TRACE, row=row, block_length=4)
    data = ax.images[0].get_array()
    assert data.shape == (2, 4)
    np.testing.assert_array_equal(np.ma.getmaskarray(data), (STEPS[row] == -1).reshape(2, 4))
    np.testing.assert_array_equal(data.filled(-1), STEPS[row].reshape(2, 4))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["block 0", "block 1"]
    # annotated with step numbers, "·" where never committed
    texts = [t.get_text() for t in ax.texts]
    assert texts == [str(s) if s != -1 else "·" for s in STEPS[row]]
    assert ax.images[0].norm.vmin == 1 and ax.images[0].norm.vmax == STEPS[row].max()


def test_commit_heatmap_without_blocks_is_one_row_and_draws_into_given_ax():
    fig, ax = plt.subplots()
    got = viz.commit_heatmap(TRACE, 0, ax, block_length=None)
    assert got is ax and got.figure is fig
    assert got.images[0].get_array().shape == (1, 8)


def test_commit_heatmap_tokens_from_generate_output():
    out = GenerateOutput(tokens=TOKENS, nfe=8, nfe_per_row=np.array([8, 3]), lengths=np.array([8, 4]),
                         finish_reasons=["length", "stop"], trace=TRACE)
    ax = viz.commit_heatmap(out, tokenizer=FakeTokenizer(), block_length=4)
    texts = [t.get_text() for t in ax.texts]
    # "$" escaped for mathtext, newline and blank shown as symbols, long text cut
    assert texts[:4] == [r"a\$b" "\n3", "⏎\n1", "␣\n2", "longt…\n4"]
    assert texts[4:] == ["t14\n5", "t15\n8", "t16\n6", "t17\n7"]
    ax.figure.canvas.draw()  # the labels render (no mathtext error)
    ax1 = viz.commit_heatmap(out, row=1, tokenizer=FakeTokenizer(), block_length=4)
    assert [t.get_text() for t in ax1.texts][4:] == ["·"] * 4


def test_errors():
    with pytest.raises(ValueError, match="block_length=3 must divide"):
        viz.commit_heatmap(TRACE, block_length=3)
    with pytest.raises(IndexError, match="row=2"):
        viz.confidence_plot(TRACE, row=2)
    with pytest.raises(ValueError, match="no trace"):
        viz.commit_heatmap(GenerateOutput(TOKENS, 8, np.array([8, 8]), np.array([8, 8]), ["length"] * 2))
    with pytest.raises(ValueError, match="do not match"):
        viz.unfolding_grid(TRACE, TOKENS[:, :4])
    with pytest.raises(KeyError, match="seconds"):
        viz.compare_plot([{"agreement": 1.0, "nfe": 3}])


@pytest.mark.parametrize("row", [0, 1])
def test_confidence_plot_bar_heights_are_the_confidences(row):
    ax = viz.confidence_plot(TRACE, row=row, block_length=4, threshold=0.5)
    heights = np.array([p.get_height() for p in ax.patches])
    want = np.where(STEPS[row] == -1, 0.0, CONF[row])
    np.testing.assert_allclose(heights, want, rtol=1e-6)
    # bars coloured by step: same step -> same colour, order of the colormap
    colors = np.array([p.get_facecolor() for p in ax.patches])
    cmap, norm = plt.get_cmap("viridis"), matplotlib.colors.Normalize(1, STEPS[row].max())
    committed = STEPS[row] != -1
    np.testing.assert_allclose(colors[committed], cmap(norm(STEPS[row][committed])), atol=1e-6)
    # the threshold line and the block boundary
    ys = [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "-" and len(line.get_ydata()) == 2]
    assert 0.5 in ys
    xs = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"]
    assert xs == [3.5]
    if row == 1:  # never committed positions marked with x on the axis
        marks = [line for line in ax.lines if line.get_marker() == "x"]
        np.testing.assert_array_equal(marks[0].get_xdata(), [4, 5, 6, 7])


def test_unfolding_states_and_grid():
    states = viz.unfolding_states(STEPS[1])
    assert states.shape == (3, 8)
    np.testing.assert_array_equal(states, [[0, 2, 2, 0, 0, 0, 0, 0],
                                           [2, 1, 1, 0, 0, 0, 0, 0],
                                           [1, 1, 1, 2, 0, 0, 0, 0]])
    ax = viz.unfolding_grid(TRACE, TOKENS, FakeTokenizer(), row=0)
    data = np.asarray(ax.images[0].get_array())
    np.testing.assert_array_equal(data, viz.unfolding_states(STEPS[0]))
    assert data.shape == (8, 8)
    # each step's "now" cells are exactly the positions committed at that step
    for s in range(8):
        np.testing.assert_array_equal(np.flatnonzero(data[s] == viz.NOW), np.flatnonzero(STEPS[0] == s + 1))
    # one label per committed cell (1 + 2 + ... + 8 positions)
    assert len(ax.texts) == int((data != viz.MASKED).sum()) == 36
    assert viz.unfolding_grid(TRACE, TOKENS, row=0, max_steps=3).images[0].get_array().shape == (3, 8)
    assert len(viz.unfolding_grid(TRACE, TOKENS, row=0, annotate=False).texts) == 0


def test_unfolding_states_all_never():
    np.testing.assert_array_equal(viz.unfolding_states(np.full(4, -1)), np.zeros((1, 4)))


def test_compare_plot_points_are_the_results():
    results = [
        {"group": "basic", "agreement": 1.0, "nfe": 32, "seconds": 0.2, "label": "fixed"},
        {"group": "dual_cache", "agreement": 0.5, "nfe": 10, "seconds": 0.05, "label": "0.5"},
        {"group": "dual_cache", "agreement": 0.75, "nfe": 14, "seconds": 0.07, "label": "0.9"},
    ]
    ax_nfe, ax_time = viz.compare_plot(results)
    assert ax_nfe.figure is ax_time.figure
    lines = {line.get_label(): line for line in ax_nfe.lines}
    np.testing.assert_array_equal(lines["dual_cache"].get_xdata(), [0.5, 0.75])
    np.testing.assert_array_equal(lines["dual_cache"].get_ydata(), [10, 14])
    np.testing.assert_array_equal(lines["basic"].get_ydata(), [32])
    times = {line.get_label(): line for line in ax_time.lines}
    np.testing.assert_array_equal(times["dual_cache"].get_ydata(), [0.05, 0.07])
    assert sorted(t.get_text() for t in ax_nfe.texts) == ["0.5", "0.9", "fixed"]
    assert [t.get_text() for t in ax_nfe.get_legend().get_texts()] == ["basic", "dual_cache"]
    fig, axes = plt.subplots(1, 2)
    assert tuple(viz.compare_plot(results[:1], axes=axes)) == tuple(axes)


def test_plots_of_a_real_generation(llada_model):
    tok = llada_model.tokenizer
    ids = tok.encode("What is 2+2?", add_special_tokens=False)
    out = llada_model.generate([ids, ids[:3]], gen_length=16, block_length=8, steps=8, return_trace=True)
    for row in (0, 1):
        ax = viz.commit_heatmap(out, row=row, tokenizer=tok, block_length=8)
        np.testing.assert_array_equal(ax.images[0].get_array().filled(-1).ravel(), out.trace["commit_step"][row])
        ax = viz.confidence_plot(out, row=row, block_length=8)
        np.testing.assert_allclose([p.get_height() for p in ax.patches], out.trace["commit_conf"][row], rtol=1e-6)
        ax = viz.unfolding_grid(out, tokenizer=tok, row=row)
        assert ax.images[0].get_array().shape == (8, 16)  # basic: 8 steps, every one commits
        ax.figure.canvas.draw()


def test_sharding_plot_one_rectangle_per_block():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import dllm_jax

    assert jax.device_count() >= 8, "tests/conftest.py simulates 8 CPU devices"
    mesh = dllm_jax.make_mesh("4x2")
    x = jax.device_put(np.zeros((8, 12), np.float32), NamedSharding(mesh, P("data", "model")))
    ax = viz.sharding_plot(x)
    rects = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in ax.patches]
    assert rects == [(c, r, 6, 2) for r in range(0, 8, 2) for c in (0, 6)]
    assert [t.get_text() for t in ax.texts] == [f"dev {i}" for i in range(8)]
    assert ax.get_title().startswith("(8, 12) ") and "'data', 'model')" in ax.get_title()
    # columns split over "model", replicated over "data": two blocks, four devices each
    y = jax.device_put(np.zeros((4, 10), np.float32), NamedSharding(mesh, P(None, "model")))
    ax = viz.sharding_plot(y)
    assert [(p.get_x(), p.get_width(), p.get_height()) for p in ax.patches] == [(0, 5, 4), (5, 5, 4)]
    assert [t.get_text() for t in ax.texts] == ["dev 0,2,4,6", "dev 1,3,5,7"]
    # 1-D: a row of blocks; more dimensions are refused
    z = jax.device_put(np.zeros(16, np.float32), NamedSharding(mesh, P("data")))
    assert len(viz.sharding_plot(z).patches) == 4
    with pytest.raises(ValueError, match="1-D or 2-D"):
        viz.sharding_plot(jax.device_put(np.zeros((2, 2, 2)), NamedSharding(mesh, P())))
