"""Image grids with labels: the prompt at the left of each row, a label (base / patched, seed) over
each column, drawn with Pillow's default font. Small images are scaled up (nearest neighbour) so
that a column is at least as wide as its label."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

PAD = 4
MAX_ROW_LABEL = 48  # characters; longer prompts are cut with "..."
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def _short(text: str) -> str:
    return text if len(text) <= MAX_ROW_LABEL else text[: MAX_ROW_LABEL - 3] + "..."


def layout(image_size, row_labels, col_labels):
    """(scale, left margin, header height, cell width, cell height) of labelled_grid's picture."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text):
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0]
    w, h = image_size
    widest = max((width(c) for c in col_labels), default=0) + PAD
    scale = max(1, min(8, -(-widest // w)))
    left = max((width(_short(r)) for r in row_labels), default=0) + 2 * PAD
    box = probe.textbbox((0, 0), "Ag", font=font)
    header = box[3] - box[1] + 2 * PAD
    return scale, left, header, w * scale, h * scale


def labelled_grid(images, row_labels, col_labels):
    """A picture of `images` (PIL, row-major, len(row_labels) x len(col_labels)) with the labels."""
    rows, cols = len(row_labels), len(col_labels)
    if len(images) != rows * cols:
        raise ValueError(f"{len(images)} images for {rows} rows x {cols} columns")
    scale, left, header, cw, ch = layout(images[0].size, row_labels, col_labels)
    canvas = Image.new("RGB", (left + cols * cw, header + rows * ch), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, label in enumerate(col_labels):
        draw.text((left + c * cw + 2, PAD), label, fill=INK, font=font)
    for r, label in enumerate(row_labels):
        draw.text((PAD, header + r * ch + max(0, ch // 2 - 6)), _short(label), fill=INK, font=font)
    for i, im in enumerate(images):
        tile = im.convert("RGB").resize((cw, ch), Image.NEAREST) if scale > 1 else im.convert("RGB")
        canvas.paste(tile, (left + (i % cols) * cw, header + (i // cols) * ch))
    return canvas


def cell(grid_layout, row, col):
    """The (left, top, right, bottom) box of a cell, for a layout() result."""
    _, left, header, cw, ch = grid_layout
    return (left + col * cw, header + row * ch, left + (col + 1) * cw, header + (row + 1) * ch)
