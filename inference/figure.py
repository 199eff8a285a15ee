"""The explanation as one picture: the input, its reconstruction, the nearest prototypes with captions.

PrototypeDL: one row of tiles (input, reconstruction, each prototype decoded). ProtoPNet ("this looks
like that"): a column per prototype with its patch, where it was found in the input (the heatmap)
and the training image it was pushed onto, with the patch's box.
"""

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


def fit(img: Image.Image, side: int) -> Image.Image:
    """img scaled to fit a side x side tile, aspect kept (nearest neighbour: pixels stay pixels), centred."""
    img = img.convert("RGB")
    factor = side / max(img.size)
    scaled = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))),
                        Image.Resampling.NEAREST)
    tile = Image.new("RGB", (side, side), "white")
    tile.paste(scaled, ((side - scaled.width) // 2, (side - scaled.height) // 2))
    return tile


def input_caption(prediction: dict) -> list[str]:
    """The input tile's caption: the prediction and its probability, or the abstention and the class withheld."""
    probabilities = prediction["probabilities"]
    if prediction.get("label") is None:  # abstained: out of domain, the label withheld
        label = max(range(len(probabilities)), key=probabilities.__getitem__)
        return ["input: abstained", f"(out of domain; {label}? p = {probabilities[label]:.3f})"]
    return [f"input: {prediction['class_name']}", f"p = {probabilities[prediction['label']]:.3f}"]


def explanation_figure(answer: dict, input_picture: Image.Image) -> Image.Image:
    """An /explain answer (and the picture that was sent) -> one RGB image of captioned tiles."""
    blank = Image.new("L", input_picture.size)
    columns = [[(input_picture, input_caption(answer["prediction"]))]]
    if answer.get("reconstruction"):
        columns.append([(picture_from_base64(answer["reconstruction"]), ["reconstruction", "(decoder)"])])
    for rank, row in enumerate(answer["prototypes"], start=1):
        name = row.get("class_name", row["class_identity"])
        column = [(picture_from_base64(row["image"]) if row.get("image") else blank,
                   [f"#{rank} prototype {row['id']}", f"class {name}  d = {row['distance']:.3g}"])]
        if row.get("heatmap"):  # ProtoPNet: where it was found, and where it came from
            column.append((picture_from_base64(row["heatmap"]),
                           ["found in the input", f"sim {row['similarity']:.3g}  adds {row['contribution']:.3g}"]))
        if row.get("source_image"):
            column.append((picture_from_base64(row["source_image"]),
                           ["its training image", "yellow: patch, red: peak"]))
        columns.append(column)
    rows = max(len(c) for c in columns)
    side = max(max(img.size) for column in columns for img, _ in column[:1]) * SCALE
    width = MARGIN + len(columns) * (side + MARGIN)
    height = MARGIN + rows * (side + CAPTION_HEIGHT) + 14
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, column in enumerate(columns):
        x = MARGIN + i * (side + MARGIN)
        for j, (img, caption) in enumerate(column):
            y = MARGIN + j * (side + CAPTION_HEIGHT)
            canvas.paste(fit(img, side), (x, y))
            for line_no, line in enumerate(caption):
                draw.text((x, y + side + 4 + 14 * line_no), line, fill="black", font=font)
    title = f"{answer['model']['name']}:{answer['model']['version']}"
    draw.text((MARGIN, height - 14), title, fill="grey", font=font)
    return canvas
