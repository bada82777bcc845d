"""Generate unlabelled street scenes with a text-to-image diffusion model (CLOUDS' content diversity).

CLOUDS writes varied driving-scene prompts with an LLM and renders about 5k images with
Stable Diffusion at 768x768; self-training then reads them as an unlabelled folder
(:class:`vfm_adapters.adaptation.self_training.UnlabelledFolder`). This module ships
:data:`SCENE_PROMPTS` (weather, time of day, cities, road types) and
:func:`generate_images`, which needs the optional ``diffusers`` package
(``pip install "vfm-adapters[generate]"`` or ``pip install diffusers``) and a model
checkpoint; ``diffusers`` is imported only when generating.

Command line::

    python -m vfm_adapters.adaptation.generate OUT_DIR --num-images 5000 \\
        --model stabilityai/stable-diffusion-2-1 --size 768
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["SCENE_PROMPTS", "generate_images", "load_prompts", "prompt_for"]

#: Driving-scene prompts: weather, time of day, cities and road types.
SCENE_PROMPTS: tuple[str, ...] = (
    "a photo of a city street in Zurich on a sunny morning, cars and pedestrians, dashcam view",
    "a photo of a busy downtown street in New York at night, wet asphalt reflecting neon signs, taxis",
    "a photo of a suburban road in Germany on an overcast afternoon, parked cars, trees and sidewalks",
    "a photo of a narrow street in Tokyo in heavy rain, umbrellas, traffic lights, view from a car",
    "a photo of a highway near Los Angeles at sunset, trucks and cars, palm trees, dashcam",
    "a photo of a snowy street in Montreal in winter, snow-covered cars, pedestrians in coats",
    "a photo of a foggy road in London in the early morning, double-decker bus, street lamps",
    "a photo of a street in Paris in spring, cyclists, cafes, buildings with balconies, driver's view",
    "a photo of a road in Mumbai at noon, motorcycles, buses, crowded sidewalks, bright sunlight",
    "a photo of a street in Stockholm at dusk, light drizzle, tram tracks, cyclists",
    "a photo of an intersection in Beijing on a hazy day, many cars, traffic signs, pedestrians crossing",
    "a photo of a rural road in Italy on a summer afternoon, vineyards, a truck, poles and fences",
    "a photo of a city street in Amsterdam on a rainy evening, bicycles, canals, street lights",
    "a photo of a street in San Francisco on a foggy morning, steep hill, cable car, parked cars",
    "a photo of a road in Oslo during a snowstorm at night, headlights, snow on the road",
    "a photo of a street in Barcelona on a hot sunny day, motorcycles, pedestrians, palm trees",
    "a photo of a street in Moscow in autumn, fallen leaves, buses, wide sidewalks, cloudy sky",
    "a photo of a residential street in Sydney at golden hour, parked cars, fences, vegetation",
    "a photo of a street in Seoul at night in the rain, shop signs, taxis, people with umbrellas",
    "a photo of a road in Cape Town on a windy day, mountains in the background, minibus taxis",
    "a photo of a city street in Berlin on a grey winter day, trams, cyclists, traffic lights",
    "a photo of a street in Mexico City at midday, colourful buildings, cars, street vendors",
    "a photo of a road through a forest near Munich at dawn, mist, a single car, road signs",
    "a photo of a street in Chicago during a thunderstorm, dark clouds, wet road, trucks",
    "a photo of a street in Rome at night, scooters, old buildings, warm street lights",
    "a photo of a street in Bangkok in a tropical downpour, tuk-tuks, flooded road edge",
    "a photo of a street in Helsinki on a clear frosty morning, low sun, long shadows, buses",
    "a photo of a road in Dubai in a sandstorm, hazy orange sky, cars with headlights on",
    "a photo of a quiet street in Kyoto in light snow, pedestrians, traditional houses, poles",
    "a photo of a city street in Toronto at twilight after rain, reflections, cyclists, cars",
    "a photo of a construction zone on a street in Frankfurt, cones, a truck, workers, cloudy",
    "a photo of a roundabout in a French town on a misty evening, cars, signs, vegetation",
)


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """Prompts from a text file (one a line, ``#`` comments skipped), or :data:`SCENE_PROMPTS`.

    Example:
        >>> len(load_prompts()) >= 30
        True
    """
    if path is None:
        return list(SCENE_PROMPTS)
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def prompt_for(index: int, prompts: Sequence[str] = SCENE_PROMPTS) -> str:
    """The prompt of image ``index``: prompts are used in turn.

    Example:
        >>> prompt_for(len(SCENE_PROMPTS)) == SCENE_PROMPTS[0]
        True
    """
    return prompts[index % len(prompts)]


def _require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "generating images needs the optional 'diffusers' package: pip install diffusers "
            "(or pip install 'vfm-adapters[generate]')"
        ) from error
    return diffusers


def generate_images(
    out_dir: str | os.PathLike,
    num_images: int,
    model: str = "stabilityai/stable-diffusion-2-1",
    prompts: Sequence[str] | None = None,
    size: int = 768,
    steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = 4,
    seed: int = 0,
    device: str | None = None,
    negative_prompt: str | None = "blurry, cartoon, drawing, text, watermark",
    pipeline: Any | None = None,
) -> list[Path]:
    """Renders ``num_images`` street scenes into ``out_dir`` as ``{index:06d}.png``.

    Image ``i`` uses :func:`prompt_for` ``(i)`` and a generator seeded with ``seed + i``,
    so a run can be extended or resumed: existing files are skipped. A ``prompts.txt``
    next to the images records the prompt of each image.

    Args:
        out_dir: Output folder.
        num_images: Number of images (CLOUDS: about 5000).
        model: A diffusers text-to-image checkpoint (local path or hub id).
        prompts: Prompts to cycle through (default :data:`SCENE_PROMPTS`).
        size: Height and width (768).
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance.
        batch_size: Images per pipeline call.
        seed: Base seed.
        device: ``"cuda"``/``"cpu"``; default CUDA when available.
        negative_prompt: Negative prompt (``None`` for none).
        pipeline: A ready diffusers pipeline (then ``model`` is not loaded).

    Returns:
        The paths of the images now present.
    """
    import torch

    prompts = list(prompts) if prompts is not None else list(SCENE_PROMPTS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i:06d}.png" for i in range(num_images)]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if todo and pipeline is None:
        diffusers = _require_diffusers()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipeline = diffusers.AutoPipelineForText2Image.from_pretrained(model, torch_dtype=dtype).to(device)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        texts = [prompt_for(i, prompts) for i in chunk]
        generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in chunk]
        kwargs = {"negative_prompt": [negative_prompt] * len(chunk)} if negative_prompt else {}
        images = pipeline(prompt=texts, height=size, width=size, num_inference_steps=steps,
                          guidance_scale=guidance_scale, generator=generators, **kwargs).images
        for i, image in zip(chunk, images):
            image.save(paths[i])
    (out / "prompts.txt").write_text("".join(f"{p.name}\t{prompt_for(i, prompts)}\n" for i, p in enumerate(paths)))
    return [p for p in paths if p.is_file()]


def main(argv: list[str] | None = None) -> int:
    """``python -m vfm_adapters.adaptation.generate OUT_DIR --num-images N``."""
    parser = argparse.ArgumentParser(description="Generate street scenes for self-training (needs diffusers).")
    parser.add_argument("out_dir")
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--model", default="stabilityai/stable-diffusion-2-1")
    parser.add_argument("--prompts", default=None, help="text file with one prompt a line (default: the shipped list)")
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = generate_images(args.out_dir, args.num_images, args.model, load_prompts(args.prompts), args.size,
                            args.steps, batch_size=args.batch_size, seed=args.seed)
    print(f"{len(paths)} images in {args.out_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
