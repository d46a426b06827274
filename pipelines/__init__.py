"""What a user calls from Python."""

from pipelines.text_to_image import TextToImageOutput, TextToImagePipeline

__all__ = ["TextToImagePipeline", "TextToImageOutput"]
