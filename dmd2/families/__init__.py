"""Model families: everything family-specific hides behind `Family`."""

from dmd2.families.base import Family
from dmd2.families.pixel import PixelFamily


def family_class(name: str) -> type[Family]:
    """The Family subclass for a config's `family` name: pixel, sdxl, sd15, sd3 or flux."""
    if name == "pixel":
        return PixelFamily
    if name == "sdxl":
        from dmd2.families.sdxl import SDXLFamily

        return SDXLFamily
    if name == "sd15":
        from dmd2.families.sd15 import SD15Family

        return SD15Family
    if name == "sd3":
        from dmd2.families.sd3 import SD3Family

        return SD3Family
    if name == "flux":
        from dmd2.families.flux import FluxFamily

        return FluxFamily
    raise ValueError(f"unknown model family {name!r}: expected {', '.join(FAMILIES)}")


FAMILIES = ("pixel", "sdxl", "sd15", "sd3", "flux")

__all__ = ["FAMILIES", "Family", "PixelFamily", "family_class"]
