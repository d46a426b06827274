"""TextToImagePipeline's argument checks: each mistake is a ValueError naming the argument and what it
accepts, raised before any work (issue 19, item 14)."""

from __future__ import annotations

import math

import pytest
import torch

STEPS = 2


def call(pipe, **kw):
    args = dict(prompt="a red circle", num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kw}).images


@pytest.mark.parametrize("kw, message", [
    (dict(num_inference_steps=0), r"num_inference_steps must be a positive integer, got 0"),
    (dict(num_inference_steps=-3), r"num_inference_steps must be a positive integer, got -3"),
    (dict(num_inference_steps=2.5), r"num_inference_steps must be a positive integer, got 2.5"),
    (dict(num_inference_steps=True), r"num_inference_steps must be a positive integer, got True"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt must be a positive integer, got 0"),
    (dict(num_images_per_prompt=-1), r"num_images_per_prompt must be a positive integer, got -1"),
    (dict(height=0), r"height must be a positive integer, got 0"),
    (dict(height=-32), r"height must be a positive integer, got -32"),
    (dict(width=0), r"width must be a positive integer, got 0"),
    (dict(width=32.0), r"width must be a positive integer, got 32.0"),
    (dict(height=33), r"height and width must be multiples of 2 \(the VAE's downsampling\), got 33x32"),
    (dict(guidance_scale=math.nan), r"guidance_scale must be a finite number, got nan"),
    (dict(guidance_scale=math.inf), r"guidance_scale must be a finite number, got inf"),
    (dict(guidance_scale="5"), r"guidance_scale must be a finite number, got '5'"),
    (dict(guidance_rescale=math.nan), r"guidance_rescale must be a finite number, got nan"),
    (dict(prompt=None), r"prompt must be a string or a non-empty list of strings, got None"),
    (dict(prompt=[]), r"prompt must be a string or a non-empty list of strings, got an empty list"),
    (dict(prompt=7), r"prompt must be a string or a non-empty list of strings, got 7"),
    (dict(prompt=["a red circle", None]), r"prompt must be .* got a list holding a non-string"),
    (dict(negative_prompt=3), r"negative_prompt must be a string or a non-empty list of strings, got 3"),
    (dict(callback_on_step_end_tensor_inputs=("latent",)), r"callback_on_step_end_tensor_inputs must name"),
])
def test_bad_argument_is_a_value_error_naming_it(tiny_pipe, kw, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_pipe, **kw)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 16, 16), (1, 3, 16, 16), (4, 16, 16)])
def test_latents_of_the_wrong_shape(tiny_pipe, shape):
    """The tiny preset: 32 px -> (1, 4, 16, 16) latents per image."""
    with pytest.raises(ValueError, match=r"latents must be a tensor of shape \(1, 4, 16, 16\) .*got "
                                         + str(shape).replace("(", r"\(").replace(")", r"\)")):
        call(tiny_pipe, latents=torch.zeros(shape))


def test_latents_must_match_the_requested_size_and_batch(tiny_pipe):
    with pytest.raises(ValueError, match=r"shape \(2, 4, 8, 12\)"):
        call(tiny_pipe, latents=torch.zeros(1, 4, 16, 16), height=16, width=24, num_images_per_prompt=2)
    out = call(tiny_pipe, latents=torch.zeros(2, 4, 8, 12), height=16, width=24, num_images_per_prompt=2)
    assert out.shape == (2, 4, 8, 12)


def test_given_latents_and_integer_like_arguments_are_still_accepted(tiny_pipe):
    import numpy as np

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    a = call(tiny_pipe, latents=latents, num_inference_steps=np.int64(STEPS), guidance_scale=np.float32(5.0))
    b = call(tiny_pipe, latents=latents, guidance_scale=5)
    assert a.shape == (1, 4, 16, 16) and torch.equal(a, b)
