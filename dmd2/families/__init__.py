"""Model families: everything family-specific hides behind `Family`."""

from dmd2.families.base import Family
from dmd2.families.pixel import PixelFamily

__all__ = ["Family", "PixelFamily"]
