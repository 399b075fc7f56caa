"""The Gradio app: one module per tab (compare, arena, leaderboard, train).

`from dmd2.ui import build_app` works; gradio is imported only when the app is built.
"""


def __getattr__(name):
    if name == "build_app":
        from dmd2.ui.app import build_app
        return build_app
    raise AttributeError(f"module 'dmd2.ui' has no attribute {name!r}")


__all__ = ["build_app"]
