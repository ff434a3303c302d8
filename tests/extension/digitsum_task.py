"""A task of one's own, with options, and an M-step loss of one's own, as a user writes
them: one module, nothing in the library changes.  `digitsum.gin` imports it (gin's
`import`) and names the task, its options (a dict of DigitSumConfig's fields), the
loss and the selection rule (tests/test_extend.py runs it)."""
import dataclasses
import random

import gin

import tasks
from restem_jax import rollouts, training
from restem_jax.verifiers import MathVerifier
from tasks import common


@dataclasses.dataclass(frozen=True)
class DigitSumConfig:
  seed: int = 0
  digits: int = 3
  sizes: tuple = (("human", 300), ("pool", 3000), ("validation", 200), ("test", 500))


def read(split, data_dir, options):
  rng = random.Random(f"{options.seed}/{split}")
  rows = []
  for i in range(dict(options.sizes)[split]):
    n = "".join(rng.choice("0123456789") for _ in range(options.digits))
    total = sum(map(int, n))
    rows.append(dict(id=f"digitsum/{split}/{i}", problem=n, answer=str(total),
                     solution="+".join(n) + f"={total}\n#### {total}"))
  return rows


def configure(task, options):
  options = common.as_options(DigitSumConfig, options, task.name)
  return dataclasses.replace(task, splits=tuple(dict(options.sizes)), options=options)


TASK = tasks.register(configure(common.Task("digitsum", (), read, MathVerifier(), prompt="{problem}:",
                                            configure=configure), DigitSumConfig()))


@gin.configurable
def counted_nll(cfg):
  """The reward-weighted NLL, with a metric of its own (`counted_tokens`: the tokens it
  weighed, over the batch's weight, so 1.0) that shows in metrics.jsonl."""
  nll = training.nll_loss(cfg)

  def loss_fn(params, batch):
    total, weight, metrics = nll(params, batch)
    return total, weight, dict(metrics, counted_tokens=weight)
  loss_fn.packable = True
  return loss_fn


@gin.configurable
def even_problems_only(r, max_per_problem):
  """A selection rule of one's own (a stand-in for any): the built-in rule's picks, on the
  pool's even-numbered problems only."""
  mask = rollouts.select(r, max_per_problem)
  mask[1::2] = False
  return mask
