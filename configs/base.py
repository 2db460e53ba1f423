"""One trial: the default looped transformer on `prefix_or` with a local attention window.

Every key is documented in docs/config.md. Override from the command line with
`--config.model.block_size=4` etc.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = _task()
  c.model = _model()
  c.train = _train()
  c.eval = _eval()
  c.mesh = _mesh()
  c.distributed = _distributed()
  c.wandb = _wandb()
  return c


def _task() -> ml_collections.ConfigDict:
  """The `task` section."""
  s = ml_collections.ConfigDict()
  s.name = "prefix_or"          # prefix_or | prefix_parity | var_chain | addition | text
  s.path = ""                   # text: a prepared corpus directory (python -m train.data prepare)
  s.train_length = 16           # largest problem size seen in training (text: window tokens)
  s.min_train_length = 0        # smallest (0: same as train_length)
  s.test_lengths = (32, 64)     # longer sizes for extrapolation
  return s


def _model() -> ml_collections.ConfigDict:
  """The `model` section."""
  s = ml_collections.ConfigDict()
  s.d_model = 64
  s.n_heads = 4
  s.d_ff = 128
  s.vocab_size = 0             # 0: the task's vocabulary
  s.max_len = 64
  s.n_prelude = 1              # p
  s.block_size = 2             # k
  s.n_coda = 1                 # c
  s.injection = "add"          # none | add | concat | gate
  s.norm = "pre"               # pre | post | sandwich | peri | none
  s.peri_norm = "state"        # peri's norm per iteration: state (the block's output, before
                               # the next injection) | input (the injected input, before the block)
  s.norm_type = "rms"          # rms | layer
  s.mlp = "gelu"               # gelu | swiglu
  s.state_init = "embed"       # embed | zeros | normal | like_init
  s.state_std = 1.0            # std of the truncated normal (normal: cut at 2 std; like_init:
                               # std * sqrt(d_model), cut at 3 of that std)
  s.attention = "local"        # full | local
  s.window = 4                 # local attention width w (causal)
  s.attention_impl = "auto"    # auto (cuDNN on GPU in bfloat16, blocked on CPU, else xla) |
                               # blocked (per-query-block einsums) | xla | cudnn
  s.positions = "rope"         # rope | learned
  s.rope_style = "half"        # half: rotate (i, i+Dh/2) | pairs: rotate (2i, 2i+1)
  s.rope_base = 10000.0        # RoPE theta
  s.qk_bias = False            # learned additive bias on q and k (before RoPE)
  s.embed_scale = ml_collections.FieldReference(0.0, field_type=object)  # 0: none | a float | "sqrt_d"
  s.latent_norm = False        # the final norm also on the state before the coda (same weights)
  s.norm_eps = 1e-6            # epsilon of every norm
  s.tie_embeddings = False
  s.init_std = 0.02            # std of hidden weight matrices (0: 1/sqrt(fan_in))
  s.embed_std = 1.0            # std of the token (and learned position) embeddings
  s.dtype = "float32"          # compute dtype: float32 | bfloat16 (parameters: param_dtype)
  s.state_dtype = "float32"    # recurrent state and residual stream: float32 | bfloat16
  s.param_dtype = "float32"    # parameter dtype: float32 | bfloat16
  s.remat = False              # rematerialise each iteration in the backward pass
  s.unroll = 8                 # unroll a loop of at most this many iterations that back-propagates
                               # (faster backward pass, longer compile; 0: never)
  return s


def _train() -> ml_collections.ConfigDict:
  """The `train` section."""
  s = ml_collections.ConfigDict()
  s.steps = 600
  s.batch_size = 64
  s.seed = 0
  s.grad_accum = 1             # micro-batches per step (must divide the per-device batch)
  s.lr = 3e-3
  s.schedule = "cosine"        # constant | cosine | wsd (warmup-stable-decay), after warmup
  s.min_lr_ratio = 0.1         # cosine and wsd decay to lr * min_lr_ratio
  s.decay_fraction = 0.2       # wsd: the share of the steps spent decaying (at the end)
  s.warmup = 50
  s.b1, s.b2, s.eps = 0.9, 0.98, 1e-8  # AdamW
  s.weight_decay = 0.01
  s.no_decay = ("embed", "pos_embed")  # no weight decay (nor on vectors: norms, biases)
  s.grad_clip = 1.0
  s.recurrence = "uniform"     # fixed | uniform | poisson_lognormal
  s.mean_recurrence = 6        # r (fixed) or the mean (poisson_lognormal)
  s.min_recurrence = 2         # lower end for uniform
  s.max_recurrence = 10        # upper end (uniform) and cap (poisson_lognormal)
  s.recurrence_sigma = 0.5     # sigma of the log-normal (poisson_lognormal)
  s.init_from = ""             # a run directory whose newest parameters start this run
  s.backprop_depth = 0         # gradients through the last b iterations only (0: all)
  s.log_every = 20
  s.eval_every = 200           # 0: only at the end; -1: never (sweeps: the evaluator measures it)
  s.eval_batch_size = 256
  s.eval_recurrences = ()      # (): (mean, 2 mean, 4 mean); text: 1, 2, 4, ... up to 4 x max
  s.checkpoint_every = 200
  s.keep_checkpoints = 2
  return s


def _eval() -> ml_collections.ConfigDict:
  """The `eval` section: the fixed-point evaluation after training (python -m eval)."""
  s = ml_collections.ConfigDict()
  s.iterations = 0              # R; 0: max(128, 4 x the training maximum)
  s.batch_size = 8              # sequences whose trajectories are analysed
  s.chunk = 4                   # iterations per device call (device memory grows with it)
  s.halting = True              # sweep trials also measure adaptive halting (halting.json)
  s.control = False             # a control trial (e.g. feedforward) the sweep report compares with
  s.path_starts = 0             # random initial states for the path-independence check (0: off)
  s.vmap_trials = False         # sweeps: random-init controls differing only in seed and init
                                # scales run together, vmapped, lighter (see eval/group.py)
  return s


def _mesh() -> ml_collections.ConfigDict:
  """The `mesh` section."""
  s = ml_collections.ConfigDict()
  s.data = -1                   # -1: all devices not used by the other axes
  s.fsdp = 1
  s.tensor = 1
  return s


def _distributed() -> ml_collections.ConfigDict:
  """The `distributed` section: multi-host: every host runs the same command."""
  s = ml_collections.ConfigDict()
  s.coordinator_address = ""  # HOST:PORT of process 0 ("" : single process or auto)
  s.num_processes = 1
  s.process_id = 0
  s.auto = True          # initialise by itself on Cloud TPU pods and SLURM
  s.timeout_s = 300
  return s


def _wandb() -> ml_collections.ConfigDict:
  """The `wandb` section."""
  s = ml_collections.ConfigDict()
  s.mode = "offline"           # offline | online | disabled
  s.project = "looped-transformers"
  s.entity = ""
  s.group = ""
  s.name = ""
  s.tags = ()
  return s
