"""The parts of the ReSA train step that `bench_step.py --parts` times one by one.

Each part is jit-compiled on its own with the step's shapes: the online forward +
backward of all views, the momentum forward of views 0 and 1, Sinkhorn on the (B, B)
scores as the step shards it, and a plain supervised step (the same encoder + a linear
classifier, cross-entropy, SGD, one view) for the ReSA / supervised cost ratio.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from resa_jax import models
from resa_jax import step as step_lib
from resa_jax.models import layers
from resa_jax import sinkhorn as sinkhorn_lib

PART_LABELS = {
    'online_fwd_bwd': 'online fwd+bwd, all views',
    'momentum_fwd': 'momentum fwd, views 0-1',
    'sinkhorn': 'Sinkhorn (B, B)',
    'supervised_step': 'supervised step, 1 view',
}


class SupervisedNet(nn.Module):
  """The ReSA encoder followed by a linear classifier."""
  encoder: nn.Module
  num_classes: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    return layers.dense(self.num_classes, h.shape[-1], self.dtype, 'classifier')(h)


# --------------------------------------------------------------- parts ----

def make_parts(config, mesh, online_net, momentum_net, state, views):
  """{name: (jitted fn, args_fn)}, each part of the step on the same shapes."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
  parts = {}

  def online_loss(params, batch_stats, views):
    _, embeddings, new_stats = step_lib.forward_views(online_net, params, batch_stats, views)
    # A scalar of every view's embedding, so the backward covers all of them.
    return sum(jnp.mean(jnp.square(z.astype(jnp.float32))) for z in embeddings), new_stats

  online_fwd_bwd = jax.jit(jax.value_and_grad(online_loss, has_aux=True),
                           in_shardings=(replicated, replicated, batch_sharding))
  parts['online_fwd_bwd'] = (
      online_fwd_bwd, lambda: (state.params, state.batch_stats, views))

  def momentum_forward(params, batch_stats, views):
    encodings, embeddings, new_stats = step_lib.forward_views(momentum_net, params, batch_stats,
                                                           views)
    return encodings[0], embeddings, new_stats

  momentum_fwd = jax.jit(momentum_forward, in_shardings=(replicated, replicated, batch_sharding))
  parts['momentum_fwd'] = (
      momentum_fwd, lambda: (state.momentum_params, state.momentum_batch_stats, views[:2]))

  # Sinkhorn as the step runs it: rows sharded over the devices, columns global.
  b = config.batch_size
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, 64)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  scores = jax.device_put(jnp.asarray(x @ x.T), batch_sharding)  # (B, B)
  axis = mesh.axis_names[0]
  sinkhorn = jax.jit(jax.shard_map(
      functools.partial(sinkhorn_lib.sinkhorn, epsilon=config.sinkhorn_epsilon,
                        num_iters=config.sinkhorn_iters, axis_name=axis),
      mesh=mesh, in_specs=P(axis), out_specs=P(axis)))
  parts['sinkhorn'] = (sinkhorn, lambda: (scores,))

  # Supervised step: same encoder, a linear classifier, cross-entropy, SGD, one view.
  dtype = jnp.dtype(config.dtype)
  encoder = models.create_resnet(config.arch, width_per_group=config.width_per_group,
                                 stem=config.stem, zero_init_residual=config.zero_init_residual,
                                 dtype=dtype)
  num_classes = int(config.get('fake_num_classes', 1000))
  net = SupervisedNet(encoder, num_classes, dtype)
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(0.1, momentum=config.sgd_momentum))
  variables = jax.jit(lambda: net.init(jax.random.key(1), jnp.zeros((2,) + views[0].shape[1:],
                                                                    views[0].dtype),
                                       train=False), out_shardings=replicated)()
  sup_state = {'params': variables['params'], 'batch_stats': variables['batch_stats'],
               'opt_state': jax.jit(tx.init, out_shardings=replicated)(variables['params'])}
  labels = jax.device_put(jnp.asarray(rng.integers(0, num_classes, size=(b,)), jnp.int32),
                          batch_sharding)

  def supervised_step(s, image, labels):
    def loss_fn(params):
      logits, updates = net.apply({'params': params, 'batch_stats': s['batch_stats']}, image,
                                  train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
      return jnp.mean(loss), updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(s['params'])
    updates, opt_state = tx.update(grads, s['opt_state'], s['params'])
    return {'params': optax.apply_updates(s['params'], updates), 'batch_stats': batch_stats,
            'opt_state': opt_state}, loss

  sup_step = jax.jit(supervised_step, in_shardings=(replicated, batch_sharding, batch_sharding),
                     out_shardings=(replicated, replicated), donate_argnums=(0,))
  holder = {'state': sup_state}

  def sup_fn(_, image, labels):
    holder['state'], loss = sup_step(holder['state'], image, labels)
    return loss
  parts['supervised_step'] = (
      sup_fn, lambda: (None, views[0], labels))
  return parts

