"""The authors' ReSA training step in PyTorch, re-implemented for timing only.

    python experiments/torch_reference_step.py [--batch 64] [--image-size 32] \
        [--steps 10] [--warmup 2] [--width 64]
    python experiments/torch_reference_step.py --arch resnet50 --predictor --batch 256 \
        --image-size 224 --device cuda --amp float16 [--json FILE]   # their ImageNet step

What it is: the CIFAR recipe of the authors' code (winci-ai/resa_cifar, as
docs/method.md, 'The algorithm', describes it), float32 on the CPU, written out so that
bench_step.py can time the same step on the same machine as the JAX one; with
--arch resnet50 --predictor, the ImageNet recipe's networks (winci-ai/resa), and with
--device cuda --amp float16 their mixed precision on a GPU (experiments/gpu_check.sh):

* encoder: ResNet-18 with the CIFAR stem (3x3 stride-1 conv, BN, ReLU, no
  max-pool), torchvision-style BasicBlocks (stride on the first 3x3 conv of a
  stage, 1x1 conv + BN shortcut), global average pooling, width 64 -> 512-d;
  or ResNet-50 with the ImageNet stem (their 1-pixel pad, then a 7x7 stride-2 conv
  with padding 2, BN, ReLU, 3x3 stride-2 max-pool), torchvision-style Bottlenecks
  (stride on the 3x3 conv), width 64 -> 2048-d;
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
* SGD momentum 0.9, weight decay 1e-4 (CIFAR) or 1e-5 (ImageNet), lr 0.3 or 0.5 x
  batch / 256; one step = zero_grad, forward, backward, optimizer step;
* `amp='float16'`: the forward under torch.autocast(float16) with a GradScaler, as
  their --use_fp16 (autocast keeps exp, log_softmax and the normalisations in
  float32); cudnn.benchmark on, as their distributed set-up; on a GPU each timed step
  ends with torch.cuda.synchronize().

Nothing here is used for training; `time_torch_step` is the entry point.
"""

from __future__ import annotations

import argparse
import copy
import json
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


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or in_planes != planes * 4:
      self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes * 4))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class ResNet50(nn.Module):
  """ResNet-50, the ImageNet stem, no classifier: (N, 3, H, W) -> (N, 32 * width).

  Their stem: the 1-pixel zero pad, then the 7x7 stride-2 conv with padding 2 (3 in
  all, torchvision's), BN, ReLU, the 3x3 stride-2 max-pool; stages of 3, 4, 6, 3
  Bottlenecks.
  """

  def __init__(self, width=64):
    super().__init__()
    self.pad = nn.ConstantPad2d(1, 0.0)
    self.conv1 = nn.Conv2d(3, width, 7, 2, 2, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    stages, in_planes = [], width
    for i, blocks in enumerate((3, 4, 6, 3)):
      planes = width * 2 ** i
      layers = [Bottleneck(in_planes, planes, 1 if i == 0 else 2)]
      layers += [Bottleneck(planes * 4, planes, 1) for _ in range(blocks - 1)]
      stages.append(nn.Sequential(*layers))
      in_planes = planes * 4
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.num_features = in_planes
    for m in self.modules():  # torchvision's initialisation
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(self.pad(x)))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


ENCODERS = {'resnet18': ResNet18Cifar, 'resnet50': ResNet50}


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

  def __init__(self, width=64, mlp_dim=2048, emb_dim=512, use_predictor=False,
               arch='resnet18'):
    super().__init__()
    self.encoder = ENCODERS[arch](width)
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


def make_step(model, lr=0.3 * 64 / 256, momentum=0.996, weight_decay=1e-4, amp=None):
  """One training step on a list of views; `amp='float16'`: autocast + GradScaler."""
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                              momentum=0.9, weight_decay=weight_decay)
  scaler = torch.amp.GradScaler('cuda') if amp == 'float16' else None

  def step(views):
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
      loss = model(views, momentum)
      loss.backward()
      optimizer.step()
    else:
      with torch.autocast('cuda', dtype=torch.float16):
        loss = model(views, momentum)
      scaler.scale(loss).backward()
      scaler.step(optimizer)
      scaler.update()
    return loss.detach()
  return step


def time_torch_step(batch, image_size, steps, warmup, *, width=64, mlp_dim=2048, emb_dim=512,
                    predictor=False, num_views=2, seed=0, arch='resnet18', device='cpu',
                    amp=None) -> dict:
  """Median and mean seconds of the reference step on random float32 views.

  Returns dict(median_s, mean_s, min_s, images_per_s, loss, threads, torch_version,
  device_name, peak_memory_bytes (CUDA's max_memory_allocated; None on the CPU)) after
  `warmup` untimed steps.  `arch` 'resnet18' (CIFAR stem, lr 0.3 x batch/256, weight
  decay 1e-4) or 'resnet50' (ImageNet stem, lr 0.5 x batch/256, weight decay 1e-5);
  `amp` None or 'float16' (CUDA only).  On the CPU, with torch's OpenMP threads on
  every core, any other busy process slows a step many times over (seen: 0.08 s ->
  1.5 s on a shared 2-core machine): time it on a quiet machine.
  """
  if amp not in (None, 'float16') or (amp and not device.startswith('cuda')):
    raise ValueError(f'amp must be None, or float16 on a CUDA device; got {amp!r} on {device}')
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(seed)
  cuda = device.startswith('cuda')
  if cuda:
    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats(device)
  model = ReSA(width, mlp_dim, emb_dim, use_predictor=predictor, arch=arch).to(device).train()
  imagenet = arch == 'resnet50'
  step = make_step(model, lr=(0.5 if imagenet else 0.3) * batch / 256,
                   weight_decay=1e-5 if imagenet else 1e-4, amp=amp)
  views = [torch.randn(batch, 3, image_size, image_size, device=device)
           for _ in range(num_views)]
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  for _ in range(warmup):
    step(views)
  sync()
  times, loss = [], None
  for _ in range(steps):
    start = time.perf_counter()
    loss = step(views)
    sync()
    times.append(time.perf_counter() - start)
  median_s = statistics.median(times)
  return dict(median_s=median_s, mean_s=statistics.fmean(times), min_s=min(times),
              images_per_s=batch / median_s,
              loss=float(loss) if loss is not None else float('nan'),
              threads=torch.get_num_threads(), torch_version=torch.__version__,
              device_name=torch.cuda.get_device_name(device) if cuda else 'cpu',
              peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if cuda else None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', choices=sorted(ENCODERS), default='resnet18')
  parser.add_argument('--predictor', action='store_true', help='The ImageNet predictor.')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--views', type=int, default=2)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'.")
  parser.add_argument('--amp', choices=('none', 'float16'), default='none',
                      help='float16: autocast + GradScaler (CUDA), as their --use_fp16.')
  parser.add_argument('--json', help='Also write the result, with the arguments, to this file.')
  args = parser.parse_args()
  amp = None if args.amp == 'none' else args.amp
  result = time_torch_step(args.batch, args.image_size, args.steps, args.warmup,
                           width=args.width, predictor=args.predictor, num_views=args.views,
                           arch=args.arch, device=args.device, amp=amp)
  result.update(arch=args.arch, predictor=args.predictor, batch=args.batch,
                image_size=args.image_size, views=args.views, width=args.width,
                steps=args.steps, warmup=args.warmup, device=args.device,
                dtype=amp or 'float32')
  print(f'PyTorch {torch.__version__} ReSA step, {args.arch} (width {args.width}'
        f'{", predictor" if args.predictor else ""}), batch {args.batch}, {args.views} x '
        f'{args.image_size}px, {amp or "float32"}, {result["device_name"]}: median '
        f'{result["median_s"]:.4f} s, mean {result["mean_s"]:.4f} s, '
        f'{result["images_per_s"]:.1f} images/s (loss {result["loss"]:.4f})')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1, sort_keys=True)


if __name__ == '__main__':
  main()
