"""Image grids: which seed goes in which cell, the grid as one array, and a class grid with its rows named."""

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

import dnnlib

#----------------------------------------------------------------------------
# Sample grid. With two or more classes given, one row per class (in the order given), seeds in order along the
# row; otherwise a near-square grid in seed order. Empty cells stay black.

def grid_layout(num_images, classes=None):
    """Return a list of rows, each a list of image indices (into the seed list)."""
    if classes is not None and len(set(classes)) >= 2:
        order = list(dict.fromkeys(classes))
        return [[i for i in range(num_images) if classes[i] == c] for c in order]
    cols = max(math.ceil(math.sqrt(num_images)), 1)
    return [list(range(r, min(r + cols, num_images))) for r in range(0, num_images, cols)]

def make_grid(images, rows):
    """images: dict index → uint8 CHW array; rows: from grid_layout. Returns a uint8 CHW grid."""
    c, h, w = next(iter(images.values())).shape
    cols = max(len(row) for row in rows)
    grid = np.zeros([c, len(rows) * h, cols * w], dtype=np.uint8)
    for r, row in enumerate(rows):
        for col, idx in enumerate(row):
            grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = images[idx]
    return grid

#----------------------------------------------------------------------------
# Labelled class grid: the grid enlarged (nearest neighbour, so the pixels are the real ones) with the class names
# on the left.

def label_grid(grid_path, dest, class_names, num_cols, scale=4):
    """Enlarge a class grid `scale` times and write `r name` to the left of row r."""
    with PIL.Image.open(grid_path) as img:
        grid = img.convert('RGB')
    tile = grid.width // num_cols * scale
    grid = grid.resize((grid.width * scale, grid.height * scale), PIL.Image.NEAREST)
    font = PIL.ImageFont.load_default(size=max(10, min(16, tile // 3)))
    texts = [f'{r}  {name}' for r, name in enumerate(class_names)]
    measure = PIL.ImageDraw.Draw(grid)
    label_w = max(measure.textbbox((0, 0), t, font=font)[2] for t in texts) + 14
    out = PIL.Image.new('RGB', (label_w + grid.width, grid.height), 'white')
    out.paste(grid, (label_w, 0))
    draw = PIL.ImageDraw.Draw(out)
    for r, text in enumerate(texts):
        box = draw.textbbox((0, 0), text, font=font)
        draw.text((6, r * tile + (tile - box[3] - box[1]) // 2), text, fill='black', font=font)
    with dnnlib.util.atomic_write(dest, 'wb') as f:
        out.save(f, format='png')
