"""CIFAR-100: the CIFAR-10 recipe on the 100 fine classes.

Command:
    python -m resa_jax.main --config=configs/cifar100.py --workdir=DIR

Hardware, recipe and expectations as configs/cifar10.py (authors' numbers in their
paper; not measured by us).  Evaluation uses the fine labels; the clustering
analysis (resa_jax.evaluate) also reports the 20 coarse superclasses.
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.dataset = 'cifar100'
  return config
