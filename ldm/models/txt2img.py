"""A SamplingPlan rendered and saved (sample.py's work, CompVis' txt2img): every prompt x batch x adapter sweep scale
through the one text-to-image function, samples saved as new numbered PNGs, one grid (a row per sweep scale) and,
for a sweep, a GIF. Files are never overwritten: each takes the next free number, also with other runs writing into
the same folder."""
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ldm.models.diffusion.sampling import text_to_image
from ldm.models.sampling_plan import AdapterFile, SamplingPlan
from ldm.modules.adapters import set_adapter_scale
from ldm.modules.safety import SafetyChecker
from ldm.modules.watermark import Watermarker
from ldm.util.images import image_grid, to_pil
from ldm.util.numbered import save_numbered

Mark = Callable[[Image.Image], Image.Image]


def make_watermarker(enabled: bool) -> Mark:
    """Puts the invisible watermark into an image (the identity when not `enabled`); ImportError without the
    package."""
    return Watermarker() if enabled else (lambda im: im)


def load_init_latent(model: torch.nn.Module, path: str, height: int, width: int) -> torch.Tensor:
    """Encode the image at `path`, resized to width x height, into the scaled latent (1, C, height/f, width/f)."""
    image = Image.open(path).convert("RGB").resize((width, height), resample=Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    x = x.to(model.betas.device)
    return model.get_first_stage_encoding(model.encode_first_stage(x), sample=False)


def set_sweep_scale(model: torch.nn.Module, adapters: Sequence[AdapterFile], sweep: Optional[float]) -> None:
    """Scale every adapter group to `sweep` times its own scale (outside a sweep, `sweep` is None: no-op)."""
    if sweep is not None:
        for adapter in adapters:
            set_adapter_scale(model, sweep * adapter.scale, name=adapter.name)


def render_batch(model: torch.nn.Module, plan: SamplingPlan, prompt: str, init_latent: Optional[torch.Tensor],
                 start_code: Optional[torch.Tensor], generator: torch.Generator) -> List[Image.Image]:
    """One batch of plan.n_samples images of `prompt`: txt2img from start_code (or noise from `generator`), or img2img
    (its encoding noise always from `generator`: fixed_code fixes x_T only)."""
    images = text_to_image(model, plan.n_samples * [prompt], None if init_latent is not None else start_code,
                           sampler=plan.sampler, steps=plan.steps, scale=plan.scale, eta=plan.eta,
                           init_latent=init_latent, strength=plan.strength, generator=generator, height=plan.height,
                           width=plan.width, verbose=True)
    return to_pil(images)


def save_samples(images: List[Image.Image], sample_dir: Path, mark: Mark) -> List[Path]:
    """Save `images` watermarked as new numbered PNGs of `sample_dir`, each under the next free number."""
    return [save_numbered(sample_dir, ["{:05}.png"], [lambda tmp, im=mark(im): im.save(tmp, format="PNG")])[0]
            for im in images]


def render_all(model: torch.nn.Module, plan: SamplingPlan, checker: Optional[SafetyChecker], mark: Mark
               ) -> Tuple[List[List[Image.Image]], List[str], List[Path]]:
    """Every prompt x n_iter batch at every sweep scale, samples saved; returns grid rows, captions, saved paths."""
    device = model.betas.device
    precision_scope = torch.autocast(device.type) if plan.autocast else nullcontext()
    generator = torch.Generator(device=device).manual_seed(plan.seed)
    shape = (plan.n_samples, *model.latent_shape(plan.height, plan.width))
    start_code = torch.randn(shape, generator=generator, device=device) if plan.fixed_code else None
    init_latent = load_init_latent(model, plan.init_img, plan.height, plan.width) if plan.init_img else None
    rows, captions, written = [[] for _ in plan.sweep], [], []
    for prompt in plan.prompts:
        for _ in range(plan.n_iter):
            state = generator.get_state()  # every sweep scale starts from the same noise
            for row, scale in zip(rows, plan.sweep):
                set_sweep_scale(model, plan.adapters, scale)
                generator.set_state(state)
                with torch.no_grad(), precision_scope:
                    images = render_batch(model, plan, prompt, init_latent, start_code, generator)
                images = images if checker is None else checker(images)
                row.extend(images)
                if plan.save_samples:
                    written += save_samples(images, plan.outdir / "samples", mark)
            captions += [f"{prompt}\nseed {plan.seed}, #{len(captions) + i}" for i in range(plan.n_samples)]
    return rows, captions, written


def save_grids(rows: List[List[Image.Image]], captions: List[str], plan: SamplingPlan, mark: Mark) -> List[Path]:
    """The run's grid (one row per sweep scale) and, with plan.gif, the sweep's animation, under the next free
    number; returns their paths."""
    sweep = plan.sweep[0] is not None
    labels = captions if plan.label else None
    row_labels = [f"scale {s:g}" for s in plan.sweep] if sweep and plan.label else None
    names, writers = [], []
    if plan.save_grid:
        n_cols = len(rows[0]) if sweep else plan.n_rows or plan.n_samples
        grid = mark(image_grid([im for row in rows for im in row], n_cols, labels and labels * len(rows), row_labels))
        names.append("grid-{:04}.png")
        writers.append(lambda tmp: grid.save(tmp, format="PNG"))
    if plan.gif:  # GIF's 256-colour palette would not keep the watermark: the frames go unmarked
        texts = row_labels or [None] * len(rows)
        frames = [image_grid(row, len(row), labels, text and [text]) for row, text in zip(rows, texts)]
        names.append("sweep-{:04}.gif")
        writers.append(lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=700, loop=0))
    return save_numbered(plan.outdir, names, writers) if names else []


def render(model: torch.nn.Module, plan: SamplingPlan, checker: Optional[SafetyChecker], mark: Mark) -> List[Path]:
    """Render and save the whole plan: the samples, then the grid (and GIF); returns every file written."""
    rows, captions, written = render_all(model, plan, checker, mark)
    return written + save_grids(rows, captions, plan, mark)
