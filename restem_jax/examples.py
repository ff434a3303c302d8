"""The policy's training sets, as `training.train` reads them: from token lists,
prompt + completion + EOS per row, right-padded to `max_len`, with

  tokens    [N, max_len] int32  the tokens, 0 after the end
  loss_mask [N, max_len] int32  1 on the completion and its EOS (what is trained)
  weight    [N]          float32 each example's weight (the kept sample's reward;
                                 1.0 for human solutions)

Kept samples (`rollouts.examples`) and human solutions (`restem.human_examples`)
both come through here; reward-model sets are built by `reward.pack`.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np


def policy_examples(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                  rewards: Sequence[float], eos_id: int, max_len: int) -> dict:
  """Token lists -> a training set: prompt + completion + EOS, right-padded to
  `max_len`, loss on the completion and EOS.  Longer examples are dropped (and
  counted in a warning)."""
  toks, masks, kept_rewards = [], [], []
  for p, c, r in zip(prompts, completions, rewards):
    c = list(c) + [eos_id]
    if len(p) + len(c) > max_len:
      continue
    t = np.zeros(max_len, np.int32)
    m = np.zeros(max_len, np.int32)
    t[:len(p) + len(c)] = list(p) + c
    m[len(p):len(p) + len(c)] = 1
    toks.append(t)
    masks.append(m)
    kept_rewards.append(r)
  if len(toks) < len(prompts):
    logging.warning("%d examples longer than max_len=%d were dropped", len(prompts) - len(toks), max_len)
  if not toks and len(prompts):
    raise ValueError(f"no training examples ({len(prompts)} given, all longer than max_len={max_len})")
  if not toks:
    return dict(tokens=np.zeros((0, max_len), np.int32), loss_mask=np.zeros((0, max_len), np.int32),
                weight=np.zeros((0,), np.float32))
  return dict(tokens=np.stack(toks), loss_mask=np.stack(masks),
              weight=np.asarray(kept_rewards, np.float32))
