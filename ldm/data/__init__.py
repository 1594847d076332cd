"""Datasets: DreamBooth subject and class images (`dreambooth`), class-image generation (`class_images`), image
folders with captions (`captions`), the Lightning data module (`datamodule`) and the synthetic tiny world
(`synthetic`)."""
