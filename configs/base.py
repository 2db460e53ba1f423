"""One trial: the default looped transformer on `prefix_or` with a local attention window.

Every key is documented in README.md ("Config keys"). Override from the command line with
`--config.model.block_size=4` etc.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.task = ml_collections.ConfigDict()
  c.task.name = "prefix_or"          # prefix_or | prefix_parity | var_chain | addition | text
  c.task.path = ""                   # text: a prepared corpus directory (python -m train.data prepare)
  c.task.train_length = 16           # largest problem size seen in training (text: window tokens)
  c.task.min_train_length = 0        # smallest (0: same as train_length)
  c.task.test_lengths = (32, 64)     # longer sizes for extrapolation

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 64
  c.model.n_heads = 4
  c.model.d_ff = 128
  c.model.vocab_size = 0             # 0: the task's vocabulary
  c.model.max_len = 64
  c.model.n_prelude = 1              # p
  c.model.block_size = 2             # k
  c.model.n_coda = 1                 # c
  c.model.injection = "add"          # none | add | concat | gate
  c.model.norm = "pre"               # pre | post | sandwich | peri | none
  c.model.peri_norm = "state"        # peri's norm per iteration: state (the block's output, before
                                     # the next injection) | input (the injected input, before the block)
  c.model.norm_type = "rms"          # rms | layer
  c.model.mlp = "gelu"               # gelu | swiglu
  c.model.state_init = "embed"       # embed | zeros | normal | like_init
  c.model.state_std = 1.0            # std of the truncated normal (normal: cut at 2 std; like_init:
                                     # std * sqrt(d_model), cut at 3 of that std)
  c.model.attention = "local"        # full | local
  c.model.window = 4                 # local attention width w (causal)
  c.model.attention_impl = "auto"    # auto (cuDNN on GPU in bfloat16, blocked on CPU, else xla) |
                                     # blocked (per-query-block einsums) | xla | cudnn
  c.model.positions = "rope"         # rope | learned
  c.model.rope_style = "half"        # half: rotate (i, i+Dh/2) | pairs: rotate (2i, 2i+1)
  c.model.rope_base = 10000.0        # RoPE theta
  c.model.qk_bias = False            # learned additive bias on q and k (before RoPE)
  c.model.embed_scale = ml_collections.FieldReference(0.0, field_type=object)  # 0: none | a float | "sqrt_d"
  c.model.latent_norm = False        # the final norm also on the state before the coda (same weights)
  c.model.norm_eps = 1e-6            # epsilon of every norm
  c.model.tie_embeddings = False
  c.model.init_std = 0.02            # std of hidden weight matrices (0: 1/sqrt(fan_in))
  c.model.embed_std = 1.0            # std of the token (and learned position) embeddings
  c.model.dtype = "float32"          # compute dtype: float32 | bfloat16 (parameters: param_dtype)
  c.model.state_dtype = "float32"    # recurrent state and residual stream: float32 | bfloat16
  c.model.param_dtype = "float32"    # parameter dtype: float32 | bfloat16
  c.model.remat = False              # rematerialise each iteration in the backward pass
  c.model.unroll = 8                 # unroll a loop of at most this many iterations that back-propagates
                                     # (faster backward pass, longer compile; 0: never)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 600
  c.train.batch_size = 64
  c.train.seed = 0
  c.train.grad_accum = 1             # micro-batches per step (must divide the per-device batch)
  c.train.lr = 3e-3
  c.train.schedule = "cosine"        # constant | cosine | wsd (warmup-stable-decay), after warmup
  c.train.min_lr_ratio = 0.1         # cosine and wsd decay to lr * min_lr_ratio
  c.train.decay_fraction = 0.2       # wsd: the share of the steps spent decaying (at the end)
  c.train.warmup = 50
  c.train.b1, c.train.b2, c.train.eps = 0.9, 0.98, 1e-8  # AdamW
  c.train.weight_decay = 0.01
  c.train.no_decay = ("embed", "pos_embed")  # no weight decay (nor on vectors: norms, biases)
  c.train.grad_clip = 1.0
  c.train.recurrence = "uniform"     # fixed | uniform | poisson_lognormal
  c.train.mean_recurrence = 6        # r (fixed) or the mean (poisson_lognormal)
  c.train.min_recurrence = 2         # lower end for uniform
  c.train.max_recurrence = 10        # upper end (uniform) and cap (poisson_lognormal)
  c.train.recurrence_sigma = 0.5     # sigma of the log-normal (poisson_lognormal)
  c.train.init_from = ""             # a run directory whose newest parameters start this run
  c.train.backprop_depth = 0         # gradients through the last b iterations only (0: all)
  c.train.log_every = 20
  c.train.eval_every = 200           # 0: only at the end; -1: never (sweeps: the evaluator measures it)
  c.train.eval_batch_size = 256
  c.train.eval_recurrences = ()      # (): (mean, 2 mean, 4 mean); text: 1, 2, 4, ... up to 4 x max
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 2

  c.eval = ml_collections.ConfigDict()  # the fixed-point evaluation after training (python -m eval)
  c.eval.iterations = 0              # R; 0: max(128, 4 x the training maximum)
  c.eval.batch_size = 8              # sequences whose trajectories are analysed
  c.eval.chunk = 4                   # iterations per device call (device memory grows with it)
  c.eval.halting = True              # sweep trials also measure adaptive halting (halting.json)
  c.eval.control = False             # a control trial (e.g. feedforward) the sweep report compares with
  c.eval.path_starts = 0             # random initial states for the path-independence check (0: off)
  c.eval.vmap_trials = False         # sweeps: random-init controls differing only in seed and init
                                     # scales run together, vmapped, lighter (see eval/group.py)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                   # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.distributed = ml_collections.ConfigDict()  # multi-host: every host runs the same command
  c.distributed.coordinator_address = ""  # HOST:PORT of process 0 ("" : single process or auto)
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.auto = True          # initialise by itself on Cloud TPU pods and SLURM
  c.distributed.timeout_s = 300

  c.wandb = ml_collections.ConfigDict()
  c.wandb.mode = "offline"           # offline | online | disabled
  c.wandb.project = "looped-transformers"
  c.wandb.entity = ""
  c.wandb.group = ""
  c.wandb.name = ""
  c.wandb.tags = ()
  return c
