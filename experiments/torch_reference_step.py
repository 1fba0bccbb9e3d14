"""The authors' ReSA training step in PyTorch, re-implemented for timing only.

    python experiments/torch_reference_step.py [--batch 64] [--image-size 32] \
        [--steps 10] [--warmup 2] [--width 64]

What it is: the CIFAR recipe of the authors' code (winci-ai/resa_cifar, as
docs/method.md, 'The algorithm', describes it), float32 on the CPU, written out so that
bench_step.py can time the same step on the same machine as the JAX one:

* encoder: ResNet-18 with the CIFAR stem (3x3 stride-1 conv, BN, ReLU, no
  max-pool), torchvision-style BasicBlocks (stride on the first 3x3 conv of a
  stage, 1x1 conv + BN shortcut), global average pooling, width 64 -> 512-d;
* projector: Linear(512, 2048)-BN-ReLU-Linear(2048, 2048)-BN-ReLU-Linear(2048, 512)
  -BN(affine=False); optionally the ImageNet recipe's predictor
  Linear(512, 2048)-BN-ReLU-Linear(2048, 512) on the online branch;
* momentum encoder and projector: copies, updated by EMA of the parameters
  under no_grad right before their forward pass; BatchNorm in train mode;
* every view goes through the networks separately;
* Sinkhorn-Knopp in the exp domain (docs/method.md, 'Sinkhorn-Knopp'), epsilon 0.05, 3
  iterations, on normalize(h_0) @ normalize(hm_0).T;
* loss: mean over (q, v), q != v of the cross-entropy between the assignment and
  softmax(z_q @ zm_v.T / 0.4) (docs/method.md, 'One training step', step 5);
* SGD momentum 0.9, weight decay 1e-4; one step = zero_grad, forward, backward,
  optimizer step.

Nothing here is used for training; `time_torch_step` is the entry point.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

EPSILON, SINKHORN_ITERS, TEMPERATURE = 0.05, 3, 0.4


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or in_planes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class ResNet18Cifar(nn.Module):
  """ResNet-18, the authors' CIFAR stem, no classifier: (N, 3, H, W) -> (N, 8 * width).

  As theirs (winci-ai/resa_cifar src/resnet.py + src/model.py): the ResNet's 1-pixel
  zero pad stays in front of the swapped-in 3x3 stride-1 conv1 (32 -> 34 px).
  """

  def __init__(self, width=64):
    super().__init__()
    self.pad = nn.ConstantPad2d(1, 0.0)
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    layers, in_planes = [], width
    for i in range(4):
      planes = width * 2 ** i
      stride = 1 if i == 0 else 2
      layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride),
                                  BasicBlock(planes, planes, 1)))
      in_planes = planes
    self.layer1, self.layer2, self.layer3, self.layer4 = layers
    self.num_features = in_planes
    for m in self.modules():  # torchvision's initialisation
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

  def forward(self, x):
    x = self.relu(self.bn1(self.conv1(self.pad(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def projector(in_dim, mlp_dim=2048, emb_dim=512):
  return nn.Sequential(
      nn.Linear(in_dim, mlp_dim), nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True),
      nn.Linear(mlp_dim, mlp_dim), nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True),
      nn.Linear(mlp_dim, emb_dim), nn.BatchNorm1d(emb_dim, affine=False))


def predictor(emb_dim=512, mlp_dim=2048):
  return nn.Sequential(nn.Linear(emb_dim, mlp_dim), nn.BatchNorm1d(mlp_dim),
                       nn.ReLU(inplace=True), nn.Linear(mlp_dim, emb_dim))


@torch.no_grad()
def sinkhorn_knopp(scores, epsilon=EPSILON, num_iters=SINKHORN_ITERS):
  """Exp-domain Sinkhorn on Q = exp(S / eps).T (SwAV / the authors' code, one device)."""
  q = torch.exp(scores / epsilon).t()  # (K = B targets, N samples)
  num_rows, num_cols = q.shape
  q /= torch.sum(q)
  for _ in range(num_iters):
    q /= torch.sum(q, dim=1, keepdim=True)
    q /= num_rows
    q /= torch.sum(q, dim=0, keepdim=True)
    q /= num_cols
  q *= num_cols
  return q.t()


class ReSA(nn.Module):
  """Online encoder/projector(/predictor) + EMA momentum encoder/projector."""

  def __init__(self, width=64, mlp_dim=2048, emb_dim=512, use_predictor=False):
    super().__init__()
    self.encoder = ResNet18Cifar(width)
    self.projector = projector(self.encoder.num_features, mlp_dim, emb_dim)
    self.predictor = predictor(emb_dim, mlp_dim) if use_predictor else None
    self.momentum_encoder = copy.deepcopy(self.encoder)
    self.momentum_projector = copy.deepcopy(self.projector)
    for p in list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters()):
      p.requires_grad = False

  @torch.no_grad()
  def update_momentum(self, m):
    for online, target in ((self.encoder, self.momentum_encoder),
                           (self.projector, self.momentum_projector)):
      for p, pm in zip(online.parameters(), target.parameters()):
        pm.data.mul_(m).add_(p.data, alpha=1.0 - m)

  def forward(self, views, m):
    z_online = []
    for k, x in enumerate(views):
      h = self.encoder(x)
      if k == 0:
        weak_encoding = F.normalize(h.detach(), dim=1)
      z = self.projector(h)
      if self.predictor is not None:
        z = self.predictor(z)
      z_online.append(F.normalize(z, dim=1))
    with torch.no_grad():
      self.update_momentum(m)
      z_momentum = []
      for k, x in enumerate(views[:2]):
        hm = self.momentum_encoder(x)
        if k == 0:
          weak_momentum_encoding = F.normalize(hm, dim=1)
        z_momentum.append(F.normalize(self.momentum_projector(hm), dim=1))
      assignment = sinkhorn_knopp(weak_encoding @ weak_momentum_encoding.t())
    loss, pairs = 0.0, 0
    for q, zq in enumerate(z_online):
      for v, zv in enumerate(z_momentum):
        if q == v:
          continue
        log_probs = F.log_softmax(zq @ zv.t() / TEMPERATURE, dim=1)
        loss = loss - torch.mean(torch.sum(assignment * log_probs, dim=1))
        pairs += 1
    return loss / pairs


def make_step(model, lr=0.3 * 64 / 256, momentum=0.996):
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                              momentum=0.9, weight_decay=1e-4)

  def step(views):
    optimizer.zero_grad(set_to_none=True)
    loss = model(views, momentum)
    loss.backward()
    optimizer.step()
    return loss.detach()
  return step


def time_torch_step(batch, image_size, steps, warmup, *, width=64, mlp_dim=2048, emb_dim=512,
                    predictor=False, num_views=2, seed=0) -> dict:
  """Median and mean seconds of the reference step on random float32 views.

  Returns dict(median_s, mean_s, min_s, loss, threads) after `warmup` untimed steps.
  With torch's OpenMP threads on every core, any other busy process slows a step
  many times over (seen: 0.08 s -> 1.5 s on a shared 2-core machine): time it on
  a quiet machine.
  """
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(seed)
  model = ReSA(width, mlp_dim, emb_dim, use_predictor=predictor).train()
  step = make_step(model, lr=0.3 * batch / 256)
  views = [torch.randn(batch, 3, image_size, image_size) for _ in range(num_views)]
  for _ in range(warmup):
    step(views)
  times, loss = [], None
  for _ in range(steps):
    start = time.perf_counter()
    loss = step(views)
    times.append(time.perf_counter() - start)
  return dict(median_s=statistics.median(times), mean_s=statistics.fmean(times), min_s=min(times),
              loss=float(loss) if loss is not None else float('nan'),
              threads=torch.get_num_threads())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--width', type=int, default=64)
  args = parser.parse_args()
  result = time_torch_step(args.batch, args.image_size, args.steps, args.warmup, width=args.width)
  print(f'PyTorch {torch.__version__} ReSA step, ResNet-18 (width {args.width}) CIFAR stem, '
        f'batch {args.batch}, 2 x {args.image_size}px, float32, {result["threads"]} threads: '
        f'median {result["median_s"]:.4f} s, mean {result["mean_s"]:.4f} s '
        f'(loss {result["loss"]:.4f})')


if __name__ == '__main__':
  main()
