"""The data set API (``from workers.datasets import ...``); implemented in ``workers.data``."""
from workers.data import (  # noqa: F401
    DatasetMissingError,
    DataSplits,
    DeviceLoader,
    list_datasets,
    load_dataset,
    random_crop,
    random_flip,
    resolve_data_dir,
)

__all__ = [
    "DataSplits", "DatasetMissingError", "DeviceLoader", "list_datasets", "load_dataset",
    "random_crop", "random_flip", "resolve_data_dir",
]
