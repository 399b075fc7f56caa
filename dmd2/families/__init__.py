"""Model families: everything family-specific hides behind `Family`."""

from dmd2.families.base import Family
from dmd2.families.pixel import PixelFamily


def family_class(name: str) -> type[Family]:
    """The Family subclass for a config's `family` name: pixel, sdxl or sd15."""
    if name == "pixel":
        return PixelFamily
    if name == "sdxl":
        from dmd2.families.sdxl import SDXLFamily

        return SDXLFamily
    if name == "sd15":
        from dmd2.families.sd15 import SD15Family

        return SD15Family
    raise ValueError(f"unknown model family {name!r}: expected pixel, sdxl or sd15")


FAMILIES = ("pixel", "sdxl", "sd15")

__all__ = ["FAMILIES", "Family", "PixelFamily", "family_class"]
