"""Realistic scale, for a TPU pod slice (every worker runs the same command):

  python -m sweeps --config configs/sweeps/tpu_pod.py --workdir gs://BUCKET/runs

d=512, (2, 4⊗r, 2), var_chain with Huginn-style Poisson-log-normal recurrence (mean 8, cap 32) and
truncated backpropagation through the last 8 iterations; block size x injection x norm x 2 seeds.
The batch is sharded over data x fsdp; parameters over fsdp and tensor (see README).
"""

from configs.base import get_config as base_config


def get_config():
  c = base_config()
  c.task.update(name="var_chain", train_length=16, min_train_length=4, test_lengths=(32, 64))
  c.model.update(d_model=512, n_heads=8, d_ff=2048, mlp="swiglu", max_len=160, n_prelude=2, n_coda=2,
                 block_size=4, attention="full", dtype="bfloat16", remat=True)
  c.train.update(steps=20000, batch_size=512, lr=6e-4, warmup=1000, recurrence="poisson_lognormal",
                 mean_recurrence=8, max_recurrence=32, backprop_depth=8, log_every=100,
                 eval_every=2000, checkpoint_every=1000, eval_batch_size=512)
  c.mesh.update(data=-1, fsdp=8, tensor=1)
  c.eval.update(iterations=128, batch_size=16)
  return c


def get_hyper(h):
  return h.product([
      h.sweep("model.block_size", [2, 4]),
      h.sweep("model.injection", ["add", "concat"]),
      h.sweep("model.norm", ["sandwich", "peri"]),
      h.sweep("train.seed", [0, 1]),
  ])
