"""A byte-level looped language model on Shakespeare that trains well on 2 CPU cores in about 15 min.

  make shakespeare
  python -m train --config configs/lm_shakespeare.py --workdir runs/shakespeare
  python -m eval --workdir runs/shakespeare

(1, 2⊗r, 1), d = 128, 4 heads, full causal attention over windows of 128 bytes, trained with Huginn's
recurrence sampling (r ~ Poisson-log-normal, mean 4, cap 12) and truncated backpropagation through
the last iteration (the others keep no activations), so that more iterations than the mean do not
hurt at inference; validation at r = 1, 2, 4, ..., 32. 5000 steps of 16 windows (10.2M bytes, 2.2
passes over the training plays), AdamW with weight decay 0.1, a warmup-stable-decay schedule (the
last quarter decays). Measured figures: bench/RESULTS.md (`python -m bench.lm_shakespeare`): at the
same training budget a wider model (d = 192), longer windows (256), 2 heads, a learning rate of 8e-3
or a mean recurrence of 3 did worse; backpropagating through 1 iteration instead of 2 trained as well
per step and 1.28x faster.
"""

import ml_collections

from configs.base import get_config as base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.task.update(name="text", path="data/shakespeare", train_length=128, test_lengths=())
  c.model.update(d_model=128, n_heads=4, d_ff=512, max_len=128, n_prelude=1, block_size=2, n_coda=1,
                 injection="add", norm="sandwich", attention="full", positions="rope", mlp="gelu",
                 init_std=0.02, embed_std=0.02)
  c.train.update(steps=5000, batch_size=16, lr=5e-3, warmup=100, schedule="wsd", decay_fraction=0.25,
                 min_lr_ratio=0.01, weight_decay=0.1,
                 recurrence="poisson_lognormal", mean_recurrence=4, max_recurrence=12,
                 backprop_depth=1, eval_every=1000, eval_batch_size=64, checkpoint_every=1000,
                 log_every=50)
  c.eval.update(iterations=64, batch_size=4, halting=False)
  return c
