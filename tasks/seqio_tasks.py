"""The tasks as seqio Tasks, for t5x-style users (needs seqio + TensorFlow).

    import seqio, tasks.seqio_tasks     # registers arith, math, gsm8k, apps, humaneval
    seqio.get_mixture_or_task("math").get_dataset(split="test", sequence_length=...)

MATH, GSM8K, APPS and HumanEval read their records from the TFDS builders of
`tasks.tfds` (`seqio.TfdsDataSource`, prepared on first use from the data
folder into `tfds_data_dir`, by default TFDS's own); `arith`, which is
generated, and APPS with two of its three difficulties read through the task's
reader (`seqio.FunctionDataSource`), as does any task registered with
`use_tfds=False`.  Both give the same examples (tests).

Each task yields `inputs` (the prompt) and `targets` (the reference solution),
tokenised with the vocabulary it was registered with; its `metric_fns` score
decoded predictions with the task's own verifier, so `seqio.Evaluator` works
as it is.  Each ReST^EM iteration's kept samples are a Task too
(`register_kept`; all of a run's: `register_run(run_dir)`), holding the sampled
token ids themselves, so `seqio.PrefixLMFeatureConverter` gives exactly the
examples the M-step trains on.
"""
from __future__ import annotations

import json
import os

import numpy as np
import seqio
import tensorflow as tf

import tasks as tasks_lib
from restem_jax import verifiers
from restem_jax import vocab as vocab_lib
from tasks import common
from tasks import tfds as restem_tfds


class _Vocabulary(seqio.Vocabulary):
  """One of `restem_jax.vocab`'s vocabularies as a seqio.Vocabulary."""

  def __init__(self, vocab):
    self._v = vocab
    super().__init__(extra_ids=0)

  eos_id = property(lambda self: self._v.eos_id)
  unk_id = property(lambda self: None)
  _base_vocab_size = property(lambda self: self._v.vocab_size)

  def _encode(self, s):
    return self._v.encode(s)

  def _decode(self, ids):
    return self._v.decode(ids)

  def _encode_tf(self, s):
    return tf.py_function(lambda t: tf.constant(self._v.encode(t.numpy().decode()), tf.int32), [s], tf.int32)

  def _decode_tf(self, ids):
    return tf.py_function(lambda t: tf.constant(self._v.decode(t.numpy().tolist())), [ids], tf.string)

  def __eq__(self, other):
    return isinstance(other, _Vocabulary) and other._v == self._v


def to_seqio(vocab=None) -> seqio.Vocabulary:
  if vocab is None or isinstance(vocab, vocab_lib.ByteVocabulary):
    return seqio.ByteVocabulary()
  return vocab if isinstance(vocab, seqio.Vocabulary) else _Vocabulary(vocab)


def _features(vocab) -> dict:
  v = to_seqio(vocab)
  return {"inputs": seqio.Feature(v, add_eos=False), "targets": seqio.Feature(v, add_eos=True)}


def _postprocess(output, example=None, is_target=False):
  """Targets become the problem id (the verifier looks the problem up); predictions stay text."""
  if is_target:
    return example["id"].decode() if isinstance(example["id"], bytes) else str(example["id"])
  return output


def verifier_metric(task: common.Task, workers: int | None = None):
  """seqio metric fn: accuracy (%) of predictions under the task's verifier."""
  def accuracy(targets, predictions):
    records = {r["id"]: r for split in task.splits for r in task.load(split)}
    missing = [t for t in targets if t not in records]
    if missing:
      raise KeyError(f"{task.name}: ids not in the task: {missing[:3]}")
    rewards, _, _ = verifiers.verify_batch(task.verifier, [(records[t], p) for t, p in
                                                           zip(targets, predictions)], workers=workers)
    return {"accuracy": 100.0 * float(np.mean(rewards)) if len(rewards) else 0.0}
  return accuracy


def _from_records(task: common.Task, fields: dict):
  """Preprocessor: a TFDS record -> inputs (the task's prompt, rendered in Python as the
  reader's records are, chat templates included), targets, answer, id."""
  keys = [k for k, kind in fields.items() if kind not in ("texts", "ratings")]

  def render(*values):
    return task.format_prompt(restem_tfds.decode({k: v.numpy() for k, v in zip(keys, values)}, fields))

  def one(ex):
    prompt = tf.py_function(render, [ex[k] for k in keys], tf.string)
    prompt.set_shape([])
    return {"inputs": prompt, "targets": ex["solution"], "answer": ex["answer"], "id": ex["id"]}
  return lambda ds: ds.map(one, num_parallel_calls=tf.data.AUTOTUNE)


def register(task: common.Task, vocab=None, name: str | None = None, *, use_tfds: bool = True,
             tfds_data_dir: str | None = None) -> seqio.Task:
  """`task` (a value: its data folder, prompt and options) as the seqio Task `name`.

  Its records come from its TFDS dataset (`tasks.tfds.tfds_name(task)`; the data
  folder `task.data_dir` is the builder's source, `tfds_data_dir` where it is
  prepared), or from the task's reader where it has none or `use_tfds` is False."""
  name = name or task.name
  tfds_name = restem_tfds.tfds_name(task) if use_tfds else None
  if tfds_name:
    source = seqio.TfdsDataSource(
        tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=restem_tfds.split_map(task),
        tfds_builder_kwargs={"source_dir": common.resolve_data_dir(task.data_dir)})
    first = [_from_records(task, restem_tfds.BUILDERS[task.name].FIELDS)]
  else:
    def dataset_fn(split, shuffle_files=False, seed=None):
      rows = task.load(split)
      return tf.data.Dataset.from_tensor_slices({
          "inputs": [r["prompt"] for r in rows], "targets": [r.get("solution") or "" for r in rows],
          "answer": [str(r.get("answer", "")) for r in rows], "id": [str(r["id"]) for r in rows]})
    source, first = seqio.FunctionDataSource(dataset_fn, splits=task.splits), []

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=first + [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=_features(vocab), postprocess_fn=_postprocess,
      metric_fns=[verifier_metric(task)])


def register_kept(name: str, path: str, vocab=None) -> seqio.Task:
  """The kept samples of an E-step (`kept.jsonl` with prompt_ids, completion_ids,
  reward) as the seqio Task `name`, split 'train', already tokenised."""
  fields = {"id": str, "prompt": str, "completion": str, "prompt_ids": list,
            "completion_ids": list, "reward": (int, float)}

  def dataset_fn(split, shuffle_files=False, seed=None):
    rows = common.read_jsonl(path, fields)
    return tf.data.Dataset.from_generator(
        lambda: ({"inputs": np.asarray(r["prompt_ids"], np.int32),
                  "targets": np.asarray(r["completion_ids"], np.int32),
                  "inputs_pretokenized": r["prompt"], "targets_pretokenized": r["completion"],
                  "reward": np.float32(r["reward"]), "id": r["id"]} for r in rows),
        output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                          "targets": tf.TensorSpec([None], tf.int32),
                          "inputs_pretokenized": tf.TensorSpec([], tf.string),
                          "targets_pretokenized": tf.TensorSpec([], tf.string),
                          "reward": tf.TensorSpec([], tf.float32), "id": tf.TensorSpec([], tf.string)})

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=("train",)),
      preprocessors=[seqio.preprocessors.append_eos_after_trim], output_features=_features(vocab))


def register_run(run_dir: str, vocab=None) -> list[str]:
  """Registers the kept sets of a ReST^EM run directory under the names its log
  gives them (`metrics.jsonl` rows with `seqio_task`, e.g. `arith_restem_iter1`,
  each the stage's `kept.jsonl`); returns the names."""
  names = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row.get("seqio_task"):
        names[row["seqio_task"]] = os.path.join(run_dir, row["stage"], "kept.jsonl")
  for name, path in names.items():
    register_kept(name, path, vocab)
  return list(names)


for _task in tasks_lib.TASKS.values():
  register(_task)
