"""A synthetic picture for examples and tests: no photograph ships with the package."""

from __future__ import annotations


def scene(width: int = 900, height: int = 400):
    """A synthetic landscape (sky, grass, house, sun): wide enough for two pan-and-scan crops,
    with shapes whose place on the picture is easy to check by eye."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, int(height * 0.7), width, height], fill=(80, 160, 70))
    d.ellipse([int(width * 0.78), 40, int(width * 0.78) + 100, 140], fill=(250, 210, 60))
    d.rectangle([150, 180, 330, 300], fill=(180, 70, 60))
    d.polygon([(130, 180), (240, 100), (350, 180)], fill=(110, 50, 40))
    return img
