"""Datasets: DreamBooth subject and class images (`dreambooth`), class-image generation (`class_images`)."""
