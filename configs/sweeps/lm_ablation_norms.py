"""`lm_ablation.py` with the norm axis pre | sandwich | peri (37 trials): does the norm scheme change
which looped language models settle into cyclic fixed points?"""

from configs.sweeps import lm_ablation


def get_config():
  return lm_ablation.get_config()


def get_hyper(h):
  return lm_ablation.get_hyper(h, norms=("pre", "sandwich", "peri"))
