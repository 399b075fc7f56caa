"""dmd2-studio: DMD2 few-step students, their samplers, metrics and the demo app."""

__version__ = "0.1.0"
