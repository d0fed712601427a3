"""Figures: what the heatmaps show (colour range, annotations), checked on the figure objects."""

from __future__ import annotations

import numpy as np

from tl_skill.viz import plots

M = [[1.0, 0.071, 0.007], [0.071, 1.0, 0.012], [0.007, 0.012, 1.0]]
TASKS = ["a", "b", "c"]


def _texts(fig):
    return list(fig.axes[0].texts)


def test_similarity_colours_span_the_off_diagonal_only():
    fig = plots.plot_task_matrix(M, TASKS, title="t", scale_diagonal=False)
    ax = fig.axes[0]
    im = ax.images[-1]
    assert (im.norm.vmin, im.norm.vmax) == (0.007, 0.071)
    assert np.isnan(np.asarray(im.get_array().filled(np.nan))).sum() == 3  # the diagonal is not coloured
    texts = [t.get_text() for t in _texts(fig)]
    assert texts == ["1.000", "0.071", "0.007", "0.071", "1.000", "0.012", "0.007", "0.012", "1.000"]


def test_default_colours_include_the_diagonal_and_text_contrasts():
    fig = plots.plot_task_matrix(M, TASKS, title="t")
    im = fig.axes[0].images[-1]
    assert (im.norm.vmin, im.norm.vmax) == (0.007, 1.0)
    texts = _texts(fig)
    assert texts[0].get_text() == "1.00"  # values up to 1: two decimals
    # viridis: the top of the scale is yellow (black text), the bottom dark purple (white text)
    assert texts[0].get_color() == "black" and texts[2].get_color() == "white"


def test_centred_scale_is_symmetric():
    fig = plots.plot_task_matrix([[0.2, -0.05], [0.1, 0.0]], ["a", "b"], title="gain", center=0.0)
    im = fig.axes[0].images[-1]
    assert (im.norm.vmin, im.norm.vmax) == (-0.2, 0.2)
