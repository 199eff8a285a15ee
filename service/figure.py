"""The explanation as one picture: the input, its reconstruction, the nearest prototypes with captions."""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw, ImageFont

SCALE = 4  # 28x28 digits become 112x112 tiles
CAPTION_HEIGHT = 52
MARGIN = 8


def picture_from_base64(text: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(text)))
    img.load()
    return img


def explanation_figure(answer: dict, input_picture: Image.Image) -> Image.Image:
    """An /explain answer (and the picture that was sent) -> one RGB image of captioned tiles."""
    prediction = answer["prediction"]
    confidence = prediction["probabilities"][prediction["label"]]
    tiles = [(input_picture, [f"input: {prediction['class_name']}", f"p = {confidence:.3f}"])]
    if answer.get("reconstruction"):
        tiles.append((picture_from_base64(answer["reconstruction"]), ["reconstruction", "(decoder)"]))
    for rank, row in enumerate(answer["prototypes"], start=1):
        caption = [f"#{rank} prototype {row['id']}",
                   f"class {row.get('class_name', row['class_identity'])}  d = {row['distance']:.3g}"]
        tiles.append((picture_from_base64(row["image"]) if row.get("image") else Image.new("L", (28, 28)), caption))
    side = max(max(img.size) for img, _ in tiles) * SCALE
    width = MARGIN + len(tiles) * (side + MARGIN)
    height = MARGIN + side + CAPTION_HEIGHT
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (img, caption) in enumerate(tiles):
        x = MARGIN + i * (side + MARGIN)
        canvas.paste(img.convert("RGB").resize((side, side), Image.Resampling.NEAREST), (x, MARGIN))
        for line_no, line in enumerate(caption):
            draw.text((x, MARGIN + side + 4 + 14 * line_no), line, fill="black", font=font)
    title = f"{answer['model']['name']}:{answer['model']['version']}"
    draw.text((MARGIN, height - 14), title, fill="grey", font=font)
    return canvas
