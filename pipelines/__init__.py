"""What a user calls from Python."""

__all__ = ["TextToImagePipeline", "TextToImageOutput"]


def __getattr__(name: str):  # PEP 562: `python -m pipelines.generate --help` answers before torch loads
    if name in __all__:
        from pipelines import text_to_image

        return getattr(text_to_image, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
