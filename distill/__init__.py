"""fedistill's dataset-distillation core: a plain PyTorch library (no Flower, no Opacus).

Data, partitions, networks, DSA augmentation, the :class:`SyntheticSet` type, the methods
behind ``distill(real_data, config)``, and one trainer/evaluator for all of them.
"""

from .augment import DSA
from .data import Dataset, DatasetInfo, LabeledImages, load_dataset
from .methods import available_methods, distill, make_config
from .networks import get_network
from .partition import class_histograms, partition
from .synthetic import SetMetadata, SyntheticSet
from .train import EvalResult, TrainConfig, evaluate, random_real_subset, train_network

__all__ = [
    "DSA", "Dataset", "DatasetInfo", "EvalResult", "LabeledImages", "SetMetadata", "SyntheticSet",
    "TrainConfig", "available_methods", "class_histograms", "distill", "evaluate", "get_network",
    "load_dataset", "make_config", "partition", "random_real_subset", "train_network",
]
