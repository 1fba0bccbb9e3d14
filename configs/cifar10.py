"""CIFAR-10, the authors' CIFAR recipe: ResNet-18 (CIFAR stem), 1000 epochs, batch 256.

Command:
    python -m resa_jax.main --config=configs/cifar10.py --workdir=DIR

Hardware: one GPU/TPU chip (the global batch of 256 is split over all devices).
Data: TFDS `cifar10` (downloaded and prepared by TFDS on first use; offline, prepare
it elsewhere and pass --config.data_dir).
Recipe (SPEC.md section 2, authors' resa_cifar): SGD momentum 0.9, lr 0.3 x batch/256,
weight decay 1e-4, 2 warm-up epochs, cosine to 0.1 x lr, EMA 0.996 -> 1, tau 0.4,
epsilon 0.05, no predictor, float32, weak + strong 32 px views without blur.
Expected runtime and accuracy: not measured by us (no GPU time yet); the authors'
paper reports ReSA's CIFAR-10 linear top-1 (see the paper's CIFAR table).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'cifar10'
  config.eval_split = 'test'
  config.crops_size = (32,)
  config.gaussian_prob = (0.0,)

  config.arch = 'resnet18'
  config.stem = 'cifar'
  config.zero_init_residual = False
  config.predictor = False
  config.dtype = 'float32'

  config.base_lr = 0.3
  config.weight_decay = 1e-4
  config.num_epochs = 1000.0
  config.knn_every_epochs = 50
  config.checkpoint_every_steps = 2000
  return config
