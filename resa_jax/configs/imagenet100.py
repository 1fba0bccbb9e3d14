"""ImageNet-100 (the standard 100-class subset), ResNet-50 recipe, 200 epochs.

Command:
    python -m resa_jax.main --config=configs/imagenet100.py --workdir=DIR

Hardware: 1-8 GPUs/TPU chips.  Data: TFDS `imagenet2012` prepared from the manual
download; the 100 classes are resa_jax/data/imagenet100_classes.txt.  Our
adaptation of the ImageNet recipe (the authors do not publish one for this
subset); not yet measured by us.
"""

from resa_jax.configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.dataset = 'imagenet100'
  config.num_epochs = 200.0
  config.knn_max_train_examples = -1
  config.knn_every_epochs = 20
  return config
