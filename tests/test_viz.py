"""lime_fast.viz: the pictures people look at (masks, segments, heatmaps, RoI overlays, panels)."""

import numpy as np
import PIL.Image

from lime_fast import viz


def test_overlay_outline_shows_on_any_colour():
    mask = np.zeros((16, 16), bool)
    mask[4:12, 5:11] = True
    for colour in ((255, 40, 40), (255, 255, 255), (0, 0, 0), (30, 160, 50)):
        img = PIL.Image.new("RGB", (32, 32), colour)
        out = np.asarray(viz.overlay(img, mask)).astype(int)
        m = np.kron(mask, np.ones((2, 2), bool))  # the mask at the image's size
        inner = m & ~np.roll(m, 1, 0) | m & ~np.roll(m, -1, 0) | m & ~np.roll(m, 1, 1) | m & ~np.roll(m, -1, 1)
        outer = ~m & (np.roll(m, 1, 0) | np.roll(m, -1, 0) | np.roll(m, 1, 1) | np.roll(m, -1, 1))
        assert (out[inner] == 255).all() and (out[outer] == 0).all()  # white inside the edge, black outside
        # whatever the colour, one of the two rings differs from it by at least half the range
        assert max(np.abs(out[inner][0] - colour).max(), np.abs(out[outer][0] - colour).max()) >= 128
        interior = m & ~inner
        if colour != (255, 40, 40):  # the tint's own colour stays itself; the rings above still show
            assert not (out[interior] == colour).all(axis=-1).any()  # tinted
        far = ~m & ~outer
        assert (out[far] == colour).all()  # untouched away from the RoI


def test_overlay_at_the_border_does_not_wrap():
    mask = np.zeros((8, 8), bool)
    mask[:, :3] = True  # touches the left, top and bottom borders
    out = np.asarray(viz.overlay(PIL.Image.new("RGB", (8, 8), (100, 100, 100)), mask)).astype(int)
    assert (out[:, 7] == 100).all()  # the right border is far from the RoI: no ring wrapped round
    assert (out[:, 3] == 0).all() and (out[:, 2] == 255).all()


def test_panel_keeps_order_and_height():
    tiles = [(str(i), PIL.Image.new("RGB", (10 * (i + 1), 10), (i * 40, 0, 0))) for i in range(3)]
    p = viz.panel(tiles, height=40)
    assert p.height > 40 and p.width >= 40 * (1 + 2 + 3)
    row = np.asarray(p)[p.height - 10]
    reds = [int(v) for v in row[:, 0] if v in (0, 40, 80)]
    assert reds[0] == 0 and reds[-1] == 80
