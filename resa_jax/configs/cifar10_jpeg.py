"""CIFAR-10 (JPEG snapshot), offline: the authors' CIFAR-10 recipe on the 60,000 JPEG files
of ../shared/datasets/cifar10_jpeg.tar.gz (lossy copies of CIFAR-10, quality about 75).

Command:
    python -m resa_jax.main --config=configs/cifar10_jpeg.py --workdir=DIR \
        [--config.data_dir=PATH/cifar10_jpeg.tar.gz]

Hardware, recipe and the authors' flags as configs/cifar10.py.  Results on this copy are
"CIFAR-10 (JPEG snapshot)", close to but not CIFAR-10's.  Baselines measured on it
(../shared/datasets/README.md): raw pixels 45.73% weighted kNN (k 20), 34.07% 5-NN
Euclidean.  Accuracy of a full run: not measured by us yet.
"""

from resa_jax.configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.dataset = 'cifar10_jpeg'
  return config
