"""The data set API (``from workers.datasets import ...``); implemented in ``workers.data``."""
from workers.data import (  # noqa: F401
    DatasetMissingError,
    DatasetOptions,
    DataSplits,
    DeviceLoader,
    list_datasets,
    load_dataset,
    options_model,
    random_crop,
    random_flip,
    resolve_data_dir,
)

__all__ = [
    "DataSplits", "DatasetMissingError", "DatasetOptions", "DeviceLoader", "list_datasets", "load_dataset",
    "options_model", "random_crop", "random_flip", "resolve_data_dir",
]
