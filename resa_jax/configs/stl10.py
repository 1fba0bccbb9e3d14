"""STL-10: pre-training on train+unlabelled (105k images, 96 px), ResNet-18.

Command:
    python -m resa_jax.main --config=configs/stl10.py --workdir=DIR

Hardware: one GPU/TPU chip.  Our adaptation of the CIFAR recipe to 96 px images
(ImageNet stem, 96 px views, blur on); the authors do not publish an STL-10
recipe, so there are no reference numbers.  kNN: train split (5k labelled) as
memory bank, test split (8k) as queries.
"""

from resa_jax.configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.dataset = 'stl10'
  config.train_split = 'train+unlabelled'
  config.eval_train_split = 'train'
  config.eval_split = 'test'
  config.crops_size = (96,)
  config.gaussian_prob = (0.5,)
  config.stem = 'imagenet'
  config.num_epochs = 500.0
  config.knn_every_epochs = 25
  return config
