"""bitbench data sets as device-resident tensors (``DataSplits``, ``DeviceLoader``) or, for image
folders too large for a device (ImageNet), streamed from disk (``folder.FolderSplits``): ``load_dataset``.

Modules: ``registry`` (names, ``load_dataset``), ``base`` (types, errors), ``prepare`` (split,
normalise), ``loader`` (batches and augmentation), one module per family of data sets
(``digits``, ``vision``, ``synthetic``, ``folder``) and ``idx`` (the (Fashion-)MNIST file format).
"""
from .base import DatasetMissingError, DatasetOptions, DataSplits
from .loader import DeviceLoader, random_crop, random_flip
from .registry import list_datasets, load_dataset, options_model, resolve_data_dir

__all__ = [
    "DataSplits", "DatasetMissingError", "DatasetOptions", "DeviceLoader", "list_datasets", "load_dataset",
    "options_model", "random_crop", "random_flip", "resolve_data_dir",
]
