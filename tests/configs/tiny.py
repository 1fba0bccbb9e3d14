"""A tiny config for end-to-end tests: fake 16x16 data, a width-4 ResNet-18, 8 steps."""

from resa_jax.configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'fake'
  config.eval_split = 'test'
  config.fake_image_size = 16
  config.fake_num_classes = 4
  config.fake_num_examples = 64
  config.crops_size = (16,)
  config.gaussian_prob = (0.0,)
  config.arch = 'resnet18'
  config.width_per_group = 4
  config.stem = 'cifar'
  config.zero_init_residual = False
  config.mlp_dim = 32
  config.emb_dim = 16
  config.dtype = 'float32'
  config.batch_size = 16  # 4 steps per epoch
  config.num_epochs = 2.0
  config.warmup_epochs = 0.5
  config.base_lr = 0.3
  config.weight_decay = 1e-4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  config.knn_every_epochs = 1
  config.knn_k = 5
  config.prefetch = 1
  return config
