"""ImageNet-1k, the authors' ViT recipe: ViT-S/16, two 224 px views, 300 epochs, batch 1024.

Command:
    python -m resa_jax.main --config=configs/imagenet_vit_small.py --workdir=DIR

Hardware: 8 GPUs/TPU chips or more (the batch of 1024 is global; the authors ran 4
GPUs x 256).  Data: TFDS `imagenet2012` from the manual download, as configs/imagenet.py.
Runtime: not yet measured by us; the step alone (no input pipeline):
    python experiments/bench_step.py --config=configs/imagenet_vit_small.py \
        --config.batch_size=256 --noparts
(one device, batch 256, bfloat16; --noparts: the supervised-baseline part is ResNet-only).

The authors' command this is (winci-ai/resa, scripts/train/vits16.sh):
    torchrun --nproc_per_node=4 main.py --arch vit_small --patch_size 16 --epochs 300
        --batch_size 256
with their ViT defaults (args.py `get_default_params`):
--optimizer adamw --lr 5e-4 --wd 0.1 --warmup_epochs 40, and --temperature 0.4
--momentum 0.996 --mlp_layers 3 --mlp_dim 2048 --emb 512, predictor on, --drop_path 0.
What their code does with these (main.py and src/utils.py `build_optimizer`):
- torch.optim.AdamW(model.parameters(), weight_decay=0.1) with PyTorch's defaults
  (betas 0.9 / 0.999, eps 1e-8): decoupled weight decay on every trainable parameter,
  biases and LayerNorms included, constant (no weight-decay schedule); the frozen ViT
  patch conv and position table (requires_grad=False) are neither updated nor decayed.
  optax.adamw has the same defaults and form.
- lr = 5e-4 x batch / 256 = 2e-3, linear warm-up from 0 over 40 epochs, then cosine to
  `final_lr = lr * 0.001` (2e-6 at batch 1024): final_lr_ratio 0.001.  (docs/method.md,
  'Hyper-parameters', gives a final lr of 1e-4, which their code does not use;
  `--config.final_lr_ratio=0.05` gives it at batch 1024.)
- no gradient clipping, no last-layer freezing (no DINO head), fp16 autocast (ours:
  bfloat16).
Their warm-up is np.linspace(0, lr, W) (reaches lr at step W - 1); ours reaches it at
step W, a relative difference of 1 / W (2e-5 here) during the warm-up only.

Evaluation (`python -m resa_jax.evaluate`): for ViTs the ImageNet linear probe uses
their eval_linear.py ViT input, the class tokens of the last 4 blocks (ViT-B: the last
block's plus the mean patch token) and base lr 0.03 (scripts/eval/linear_vits.sh);
kNN uses the class token after the final norm.

Expected accuracy (the AUTHORS' numbers for their released ViT-S/16 checkpoint, not
measured by us): linear 72.7% / kNN 68.3% top-1.
"""

from resa_jax.configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.arch = 'vit_small'
  config.optimizer = 'adamw'
  config.base_lr = 5e-4  # lr = base_lr * batch_size / 256
  config.weight_decay = 0.1
  config.warmup_epochs = 40.0
  config.final_lr_ratio = 0.001  # their build_optimizer: final_lr = lr * 0.001 for AdamW
  config.num_epochs = 300.0
  config.batch_size = 1024
  return config
