"""The bundled offline sample: ~3,800 rows in the Cauldron schema over nine subsets and all seven
categories, made only from things that install from PyPI: easy-vqa's real images and questions, and
charts, tables, text and web pages rendered here. Every row also gets a caption composed from the
generator's own annotations (captioner ``sample-annotations``), so caption-injecting recipes run offline.
A handful of deliberately broken rows (undecodable or empty images, missing answers) show the rejects path.

Deterministic: the same seed writes byte-identical Parquet files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from engine.images import encode_png
from engine.ingest import easyvqa

CAPTIONER = "sample-annotations"
PROMPT_ID = "annotations"
SOURCE = "sample"

WORDS = (
    "apple river stone cloud maple orbit delta lemon pixel harbor candle meadow rocket violet summit "
    "tiger ocean copper velvet garden falcon marble quartz willow ember cobalt prairie lantern glacier "
    "saffron thunder coral bamboo cedar indigo nectar pebble raven sable tulip walnut zephyr"
).split()
PALETTE = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
    "teal": (30, 150, 150), "brown": (130, 80, 40), "gray": (128, 128, 128), "black": (20, 20, 20),
}
NUMBER_WORDS = "zero one two three four five six seven eight nine".split()

# subset -> rows; counts differ so that temperature sampling has something to do
COUNTS = {
    "shapes_vqa": 1000, "shapes_yesno": 250, "shapes_caption": 400, "shapes_count": 400, "word_math": 300,
    "bar_charts": 500, "text_tables": 300, "rendered_words": 500, "ui_to_html": 150,
}


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _turn(user: str, assistant: str, subset: str) -> list[dict]:
    return [{"user": user, "assistant": assistant, "source": subset}]


class _EasyVQAPool:
    """easy-vqa train questions on images whose colour and shape are known from their own answers."""

    def __init__(self):
        self.annotations = easyvqa.image_annotations("train")
        self.paths = easyvqa.image_paths("train")
        qs, answers, images = easyvqa.questions("train")
        self.open = [(q, a, i) for q, a, i in zip(qs, answers, images) if i in self.annotations and a not in ("yes", "no")]
        self.yesno = [(q, a, i) for q, a, i in zip(qs, answers, images) if i in self.annotations and a in ("yes", "no")]
        self.images = sorted(self.annotations)

    def image(self, image_id: int) -> bytes:
        return easyvqa._image_bytes(self.paths[image_id])

    def caption(self, image_id: int) -> str:
        return easyvqa.annotation_caption(*self.annotations[image_id])


def _questions(pool: list, rng: np.random.Generator, n: int, subset: str, easy: _EasyVQAPool):
    for index in rng.choice(len(pool), size=n, replace=False):
        question, answer, image = pool[index]
        yield [easy.image(image)], _turn(question, answer, subset), answer, easy.caption(image)


def _shapes_caption(rng, n, subset, easy):
    for image in rng.choice(easy.images, size=n, replace=False):
        caption = easy.caption(int(image))
        yield [easy.image(int(image))], _turn("Describe the image in one sentence.", caption, subset), None, caption


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, color: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "rectangle":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _count_phrase(n: int, color: str, shape: str) -> str:
    return f"{NUMBER_WORDS[n]} {color} {shape}{'s' if n != 1 else ''}"


def _shapes_count(rng, n, subset, easy):
    shapes = ("circle", "rectangle", "triangle")
    colors = list(PALETTE)
    for _ in range(n):
        image = Image.new("RGB", (128, 128), (245, 240, 232))
        draw = ImageDraw.Draw(image)
        target, other = rng.choice(shapes, size=2, replace=False)
        target_color, other_color = rng.choice(colors, size=2, replace=False)
        n_target, n_other = int(rng.integers(1, 6)), int(rng.integers(0, 4))
        cells = rng.choice(16, size=n_target + n_other, replace=False)  # a 4x4 grid, one shape per cell
        for k, cell in enumerate(cells):
            shape, color = (target, target_color) if k < n_target else (other, other_color)
            x, y = 32 * (cell % 4) + 4, 32 * (cell // 4) + 4
            _draw_shape(draw, shape, (x, y, x + 24, y + 24), PALETTE[color])
        caption = _count_phrase(n_target, target_color, target)
        caption += f" and {_count_phrase(n_other, other_color, other)}." if n_other else "."
        yield [encode_png(image)], _turn(f"How many {target}s are there?", str(n_target), subset), str(n_target), caption.capitalize()


def _word_math(rng, n, subset, easy):
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(2, 60, size=2))
        image = int(rng.choice(easy.images))
        question = f"Ignore the picture. What is {a} plus {b}? Answer with a number."
        yield [easy.image(image)], _turn(question, str(a + b), subset), None, easy.caption(image)


def _bar_charts(rng, n, subset, easy):
    font = _font(11)
    for _ in range(n):
        k = int(rng.integers(3, 6))
        labels = [str(w) for w in rng.choice(WORDS, size=k, replace=False)]
        values = [int(v) for v in rng.choice(np.arange(1, 10), size=k, replace=False)]
        image = Image.new("RGB", (60 * k + 20, 150), "white")
        draw = ImageDraw.Draw(image)
        draw.line((10, 125, 60 * k + 10, 125), fill="black")
        for i, (label, value) in enumerate(zip(labels, values)):
            x = 20 + 60 * i
            draw.rectangle((x, 125 - 11 * value, x + 36, 125), fill=(70, 110, 200))
            draw.text((x + 12, 125 - 11 * value - 13), str(value), fill="black", font=font)
            draw.text((x, 130), label, fill="black", font=font)
        if rng.random() < 0.5:
            question, answer = "Which bar has the highest value?", labels[int(np.argmax(values))]
        else:
            i = int(rng.integers(k))
            question, answer = f"What is the value of {labels[i]}?", str(values[i])
        caption = "A bar chart with bars " + ", ".join(f"{l} = {v}" for l, v in zip(labels, values)) + "."
        yield [encode_png(image)], _turn(question, answer, subset), None, caption


def _text_tables(rng, n, subset, easy):
    font = _font(12)
    for _ in range(n):
        k = int(rng.integers(3, 5))
        items = [str(w) for w in rng.choice(WORDS, size=k, replace=False)]
        prices = [int(v) for v in rng.choice(np.arange(1, 50), size=k, replace=False)]
        image = Image.new("RGB", (200, 24 * (k + 1) + 8), "white")
        draw = ImageDraw.Draw(image)
        for r, (item, price) in enumerate([("item", "price")] + list(zip(items, prices))):
            y = 4 + 24 * r
            draw.rectangle((4, y, 196, y + 24), outline="black")
            draw.line((120, y, 120, y + 24), fill="black")
            draw.text((10, y + 5), item, fill="black", font=font)
            draw.text((126, y + 5), str(price), fill="black", font=font)
        if rng.random() < 0.5:
            i = int(rng.integers(k))
            question, answer = f"What is the price of {items[i]}?", str(prices[i])
        else:
            question, answer = "Which item costs the most?", items[int(np.argmax(prices))]
        caption = "A table of items and prices: " + ", ".join(f"{i} costs {p}" for i, p in zip(items, prices)) + "."
        yield [encode_png(image)], _turn(question, answer, subset), None, caption


def _rendered_words(rng, n, subset, easy):
    font = _font(20)
    for _ in range(n):
        text = " ".join(str(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False))
        image = Image.new("RGB", (16 + 12 * len(text), 40), "white")
        ImageDraw.Draw(image).text((8, 8), text, fill="black", font=font)
        yield [encode_png(image)], _turn("What text is written in the image?", text, subset), None, f'The image shows the text "{text}".'


def _ui_to_html(rng, n, subset, easy):
    title_font, body_font = _font(16), _font(12)
    for _ in range(n):
        title, button = (str(w).capitalize() for w in rng.choice(WORDS, size=2, replace=False))
        color = str(rng.choice(list(PALETTE)))
        image = Image.new("RGB", (200, 120), "white")
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, 200, 30), fill=PALETTE[color])
        draw.text((8, 6), title, fill="white", font=title_font)
        draw.rectangle((60, 70, 140, 96), outline="black", fill=(235, 235, 235))
        draw.text((70, 76), button, fill="black", font=body_font)
        html = (
            f'<header style="background:{color}"><h1>{title}</h1></header>\n'
            f"<main><button>{button}</button></main>"
        )
        caption = f'A web page with a {color} header titled "{title}" and a button labelled "{button}".'
        yield [encode_png(image)], _turn("Write the HTML code for this web page.", html, subset), None, caption


def _broken_rows(subset: str, easy: _EasyVQAPool):
    """Rows that must end in `rejects`: undecodable bytes, an empty image, missing answers."""
    good = easy.image(easy.images[0])
    yield [b"this is not an image"], _turn("what color is the shape?", "blue", subset), "blue", None
    yield [good[: len(good) // 3]], _turn("what color is the shape?", "blue", subset), "blue", None
    yield [b""], _turn("what shape is in the image?", "circle", subset), "circle", None
    yield [good], _turn("what shape is in the image?", "", subset), None, None
    yield [good], [], None, None


def _generators(easy: _EasyVQAPool) -> dict[str, Callable]:
    return {
        "shapes_vqa": lambda rng, n, s: _questions(easy.open, rng, n, s, easy),
        "shapes_yesno": lambda rng, n, s: _questions(easy.yesno, rng, n, s, easy),
        "shapes_caption": lambda rng, n, s: _shapes_caption(rng, n, s, easy),
        "shapes_count": lambda rng, n, s: _shapes_count(rng, n, s, easy),
        "word_math": lambda rng, n, s: _word_math(rng, n, s, easy),
        "bar_charts": lambda rng, n, s: _bar_charts(rng, n, s, easy),
        "text_tables": lambda rng, n, s: _text_tables(rng, n, s, easy),
        "rendered_words": lambda rng, n, s: _rendered_words(rng, n, s, easy),
        "ui_to_html": lambda rng, n, s: _ui_to_html(rng, n, s, easy),
    }


IMAGES_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
TEXTS_TYPE = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))


def write_sample(out: str | Path, seed: int = 0, scale: float = 1.0) -> Path:
    """Write the sample as ``out/data/{subset}/train-00000-of-00001.parquet`` plus ``out/captions.parquet``.

    Parameters
    ----------
    scale
        Multiplies every subset's row count (tests use a small fraction).
    """
    out = Path(out)
    easy = _EasyVQAPool()
    captions = {"subset": [], "row": [], "caption": []}
    for index, (subset, generate) in enumerate(_generators(easy).items()):
        rng = np.random.default_rng([seed, index])
        rows = list(generate(rng, max(1, round(COUNTS[subset] * scale)), subset))
        if subset == "shapes_vqa":
            rows.extend(_broken_rows(subset, easy))
        for row, (_, _, _, caption) in enumerate(rows):
            if caption is not None:
                captions["subset"].append(subset)
                captions["row"].append(row)
                captions["caption"].append(caption)
        table = pa.table(
            {
                "images": pa.array([[{"bytes": b, "path": None} for b in images] for images, _, _, _ in rows], IMAGES_TYPE),
                "texts": pa.array([texts for _, texts, _, _ in rows], TEXTS_TYPE),
                "label": pa.array([label for _, _, label, _ in rows], pa.string()),
            }
        )
        (out / "data" / subset).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "data" / subset / "train-00000-of-00001.parquet")
    pq.write_table(pa.table(captions), out / "captions.parquet")
    return out
