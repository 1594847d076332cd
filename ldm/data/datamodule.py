"""The Lightning data module of the CompVis configs (`data.target: ldm.data.datamodule.DataModuleFromConfig`)."""
import inspect
from typing import Any, Dict, Mapping, Optional

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from ldm.checks import ConfigError, check_number
from ldm.util.instantiate import check_ranges, instantiate_from_config, nearest

# the settings of ldm.data.class_images.ensure_class_images that data.params.class_image_sampler may hold
SAMPLER_KEYS = ("batch_size", "steps", "scale", "seed", "sampler")


def check_class_image_sampler(sampler: Mapping) -> None:
    """Refuse unknown keys and numbers out of range in data.params.class_image_sampler."""
    where = "data.params.class_image_sampler"
    bad = sorted(set(sampler) - set(SAMPLER_KEYS))
    if bad:
        raise ConfigError(f"{where}.{bad[0]} is not a setting of the class-image sampler"
                          f"{nearest(bad[0], SAMPLER_KEYS)}")
    check_number(sampler.get("batch_size", 1), f"{where}.batch_size", 1, integer=True)
    check_number(sampler.get("steps", 1), f"{where}.steps", 1, integer=True)
    check_number(sampler.get("scale", 1.0), f"{where}.scale", 0)
    check_number(sampler.get("seed", 0), f"{where}.seed", 0, 2 ** 32 - 1, integer=True)


class DataModuleFromConfig(pl.LightningDataModule):
    """Subject images (`train`) and, for prior preservation, class images (`reg`), each a target/params config; or,
    without `reg`, a caption dataset (`ldm.data.captions.CaptionDataset`) as `train`.

    A training batch is {"instance": batch of train items, "reg": batch of reg items} (without `reg`: {"instance":
    ...}); Lightning cycles the shorter loader, so every step sees both. Class-image generation settings ride along
    for main_dream_booth.py.
    """

    # Keys of the original CompVis data module that concern stages we do not have; accepted, unused.
    _IGNORED = ("validation", "test", "predict", "wrap", "shuffle_test_loader", "use_worker_init_fn",
                "shuffle_val_dataloader")
    PARAM_RANGES = {"batch_size": dict(low=1, integer=True), "reg_batch_size": dict(low=1, integer=True, optional=True),
                    "num_workers": dict(low=0, integer=True), "num_class_images": dict(low=0, integer=True)}

    def __init__(self, batch_size: int, train: Mapping, reg: Optional[Mapping] = None,
                 reg_batch_size: Optional[int] = None, num_workers: int = 0, num_class_images: int = 200,
                 class_image_sampler: Optional[Mapping] = None, **unused: Any):
        super().__init__()
        unknown = sorted(set(unused) - set(self._IGNORED))
        if unknown:
            raise ConfigError(f"DataModuleFromConfig has no parameter '{unknown[0]}'"
                              f"{nearest(unknown[0], [*inspect.signature(DataModuleFromConfig).parameters][:-1])}")
        check_ranges(DataModuleFromConfig, locals())
        check_class_image_sampler(class_image_sampler or {})
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
