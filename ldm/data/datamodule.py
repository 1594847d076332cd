"""The Lightning data module of the CompVis configs (`data.target: ldm.data.datamodule.DataModuleFromConfig`)."""
from typing import Any, Dict, Mapping, Optional

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from ldm.util import instantiate_from_config


class DataModuleFromConfig(pl.LightningDataModule):
    """Subject images (`train`) and, for prior preservation, class images (`reg`), each a target/params config; or,
    without `reg`, a caption dataset (`ldm.data.captions.CaptionDataset`) as `train`.

    A training batch is {"instance": batch of train items, "reg": batch of reg items} (without `reg`: {"instance":
    ...}); Lightning cycles the shorter loader, so every step sees both. Class-image generation settings ride along
    for main_dream_booth.py.
    """

    def __init__(self, batch_size: int, train: Mapping, reg: Optional[Mapping] = None,
                 reg_batch_size: Optional[int] = None, num_workers: int = 0, num_class_images: int = 200,
                 class_image_sampler: Optional[Mapping] = None, **unused: Any):
        super().__init__()
        if batch_size < 1 or (reg_batch_size is not None and reg_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {reg_batch_size}")
        self.batch_size, self.reg_batch_size = batch_size, reg_batch_size or batch_size
        self.configs = {"instance": train, **({"reg": reg} if reg is not None else {})}
        self.num_workers, self.num_class_images = num_workers, num_class_images
        self.class_image_sampler = dict(class_image_sampler or {})
        self.datasets: Dict[str, Dataset] = {}

    def dataset(self, name: str) -> Dataset:
        """The dataset `name` ("instance" or "reg"), built on first use."""
        if name not in self.datasets:
            self.datasets[name] = instantiate_from_config(self.configs[name])
        return self.datasets[name]

    def setup(self, stage: Optional[str] = None) -> None:
        for name in self.configs:
            self.dataset(name)

    def _loader(self, name: str) -> DataLoader:
        batch_size = self.batch_size if name == "instance" else self.reg_batch_size
        return DataLoader(self.datasets[name], batch_size=batch_size, shuffle=True, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> Dict[str, DataLoader]:
        self.setup()
        return {name: self._loader(name) for name in self.datasets}
