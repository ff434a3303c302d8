"""TFDS builders for the data of the tasks: `restem_math`, `restem_gsm8k`,
`restem_apps` (configs `all`, `introductory`, `interview`, `competition`),
`restem_humaneval` and `restem_prm800k` (needs TensorFlow Datasets).

    import tensorflow_datasets as tfds, tasks.tfds
    ds = tfds.load("restem_gsm8k", split="validation", data_dir="~/tensorflow_datasets",
                   download_and_prepare_kwargs={"download_config":
                       tfds.download.DownloadConfig(manual_dir="../shared/data")})

Nothing is downloaded: each builder reads the files of the data folder (the
folder holding math/, gsm8k/, apps/, humaneval/, prm800k/) as its manual
directory, through the task modules' own readers, so a record here has the
fields a `Task.read` record has and the splits are the tasks' splits
(`restem_gsm8k`'s validation is the last 500 training problems, as in
`tasks.gsm8k`).  The data folder is, in order: the builder argument
`source_dir`, the download config's `manual_dir` when it holds the dataset's
folder, $RESTEM_DATA_DIR, ../shared/data beside the project.  Examples keep
the files' order (`disable_shuffling`).

`load(name, split)` reads a split back as the readers' records (None,
dicts and per-step ratings restored); `tfds_name(task)` and `split_map(task)`
say which dataset and splits a `Task` value reads, for `seqio.TfdsDataSource`.
"""
from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from tasks import apps, common, gsm8k, humaneval, math, prm800k

VERSION = tfds.core.Version("1.0.0")
NOTES = {"1.0.0": "The records of restem_jax's task readers, in the tasks' splits."}
INSTRUCTIONS = """\
Give the data folder (the one holding math/, gsm8k/, apps/, humaneval/, prm800k/; in the
project: ../shared/data) as the manual directory:
`download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(manual_dir=...)}`,
or as the builder argument `source_dir`, or set $RESTEM_DATA_DIR.  Each dataset folder's
README says where its files come from."""

# How a record's field is stored.  text?: None is stored as "" and read back as None;
# int?: None as -1; json: any JSON value, as its text; ratings: +1/0/-1/None per step, as
# `ratings` (0 where unrated) beside a `rated` mask.
_FEATURES = {"text": tfds.features.Text, "text?": tfds.features.Text, "json": tfds.features.Text,
             "int?": lambda: tfds.features.Scalar(np.int32), "texts": lambda: tfds.features.Sequence(tfds.features.Text())}


def _encode(record: dict, fields: dict) -> dict:
  out = {}
  for name, kind in fields.items():
    v = record[name]
    if kind == "ratings":
      out["ratings"] = np.asarray([0 if r is None else r for r in v], np.int32)
      out["rated"] = np.asarray([r is not None for r in v], bool)
    elif kind == "json":
      out[name] = json.dumps(v)
    elif kind == "int?":
      out[name] = -1 if v is None else int(v)
    elif kind == "text?":
      out[name] = "" if v is None else v
    else:
      out[name] = v
  return out


def decode(example: dict, fields: dict) -> dict:
  """A record as the task's reader gives it, from an example of `tfds.as_numpy`."""
  out = {}
  for name, kind in fields.items():
    if kind == "ratings":
      out[name] = [int(r) if ok else None for r, ok in zip(example["ratings"], example["rated"])]
      continue
    v = example[name]
    if kind == "texts":
      out[name] = [s.decode() for s in v]
    elif kind == "int?":
      out[name] = None if int(v) == -1 else int(v)
    else:
      s = v.decode() if isinstance(v, bytes) else str(v)
      out[name] = json.loads(s) if kind == "json" else (None if kind == "text?" and not s else s)
  return out


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset of one task module's records: FOLDER in the data folder, FIELDS (field ->
  kind, above), SPLITS, and `_read(split, data_dir)`."""
  VERSION = VERSION
  RELEASE_NOTES = NOTES
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  FOLDER = ""
  FIELDS: dict = {}
  SPLITS: tuple = ()
  HOMEPAGE = ""

  def __init__(self, *, source_dir: str = "", **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)
    self._original_state["source_dir"] = source_dir  # survives pickling

  def _info(self) -> tfds.core.DatasetInfo:
    features = {}
    for name, kind in self.FIELDS.items():
      if kind == "ratings":
        features["ratings"] = tfds.features.Sequence(tfds.features.Scalar(np.int32))
        features["rated"] = tfds.features.Sequence(tfds.features.Scalar(np.bool_))
      else:
        features[name] = _FEATURES[kind]()
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                          homepage=self.HOMEPAGE, description=self.__doc__,
                                          disable_shuffling=True)  # the readers' order

  def _data_folder(self, dl_manager) -> str:
    if self._source_dir:
      return os.path.abspath(os.path.expanduser(self._source_dir))
    try:
      manual = os.fspath(dl_manager.manual_dir)
      if os.path.isdir(os.path.join(manual, self.FOLDER)):
        return manual
    except AssertionError:  # no manual directory given, or an empty one
      pass
    return common.resolve_data_dir()

  def _split_generators(self, dl_manager):
    folder = self._data_folder(dl_manager)
    common.data_path(folder, self.FOLDER)  # a clear error when it is not there
    records = {split: self._read(split, folder) for split in self.SPLITS}
    # TFDS cannot write an empty split: one with no records (in the shared APPS subset,
    # the test split of `interview` and `competition`) is left out
    return {split: self._generate_examples(rows) for split, rows in records.items() if rows}

  def _generate_examples(self, records: list[dict]):
    for i, record in enumerate(records):
      yield i, _encode(record, self.FIELDS)

  def _read(self, split: str, folder: str) -> list[dict]:
    raise NotImplementedError


_TASK_FIELDS = {"id": "text", "problem": "text", "solution": "text", "answer": "text"}


class RestemMath(_Builder):
  """MATH (Hendrycks et al. 2021) in PRM800K's 12k / 500 split: train (11,500),
  validation (the first 500 of the 12k), test (MATH-500)."""
  FOLDER, SPLITS = "math", ("train", "validation", "test")
  FIELDS = dict(_TASK_FIELDS, subject="text?", level="int?")
  HOMEPAGE = "https://github.com/openai/prm800k"

  def _read(self, split, folder):
    return math.read(split, folder)


class RestemGsm8k(_Builder):
  """GSM8K (Cobbe et al. 2021): train (the first 6,973 training problems), validation
  (the last 500), test (1,319).  `train+validation` is the task's `train_all`."""
  FOLDER, SPLITS = "gsm8k", ("train", "validation", "test")
  FIELDS = dict(_TASK_FIELDS)
  HOMEPAGE = "https://github.com/openai/grade-school-math"

  def _read(self, split, folder):
    return gsm8k.read(split, folder)


class RestemHumaneval(_Builder):
  """HumanEval (Chen et al. 2021): test (164); `problem` is the prompt, `solution` the
  canonical body, `test` the checking code."""
  FOLDER, SPLITS = "humaneval", ("test",)
  FIELDS = dict(_TASK_FIELDS, test="text", entry_point="text")
  HOMEPAGE = "https://github.com/openai/human-eval"

  def _read(self, split, folder):
    return humaneval.read(split, folder)


class RestemApps(_Builder):
  """APPS (Hendrycks et al. 2021), the problems in the data folder: train, validation
  (every 10th training problem), test.  A config per difficulty, or `all`;
  `input_output` is its JSON text."""
  FOLDER, SPLITS = "apps", ("train", "validation", "test")
  FIELDS = dict(_TASK_FIELDS, starter_code="text", input_output="json", difficulty="text?",
                apps_split="text?")
  HOMEPAGE = "https://github.com/hendrycks/apps"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="all", description="every difficulty")] + [
      tfds.core.BuilderConfig(name=d, description=f"{d} problems only") for d in apps.DIFFICULTIES]

  def _read(self, split, folder):
    name = self.builder_config.name
    return apps.read(split, folder, None if name == "all" else (name,))


class RestemPrm800k(_Builder):
  """PRM800K (Lightman et al. 2023) phase 1: train / test from the step-wise files (one
  trajectory per rated candidate step), raw_train / raw_test from the raw records.
  `ratings` are +1/0/-1 per step, 0 where `rated` is false (unrated)."""
  FOLDER, SPLITS = "prm800k", ("train", "test", "raw_train", "raw_test")
  FIELDS = {"id": "text", "problem": "text", "steps": "texts", "ratings": "ratings",
            "finish_reason": "text?"}
  HOMEPAGE = "https://github.com/openai/prm800k"

  def _read(self, split, folder):
    return prm800k.read(split, folder)


BUILDERS = {"math": RestemMath, "gsm8k": RestemGsm8k, "humaneval": RestemHumaneval,
            "apps": RestemApps, "prm800k": RestemPrm800k}


def builder(name: str, *, data_dir: str | None = None, source_dir: str = "", config: str | None = None):
  """The builder of `name` ("gsm8k", ..., or a TFDS name "restem_gsm8k[/config]")."""
  name = name.removeprefix("restem_")
  name, _, cfg = name.partition("/")
  if name not in BUILDERS:
    raise KeyError(f"no TFDS builder for {name!r}; known: {sorted(BUILDERS)}")
  kwargs = {"config": config or cfg} if (config or cfg) else {}
  return BUILDERS[name](data_dir=data_dir, source_dir=source_dir, **kwargs)


def load(name: str, split: str, *, data_dir: str | None = None, source_dir: str = "") -> list[dict]:
  """The records of a split, prepared first if needed, as the task's reader returns them."""
  b = builder(name, data_dir=data_dir, source_dir=source_dir)
  b.download_and_prepare()
  return [decode(ex, b.FIELDS) for ex in tfds.as_numpy(b.as_dataset(split=split))]


def tfds_name(task: common.Task) -> str | None:
  """The TFDS dataset a Task value's records come from, or None if no builder holds them
  (arith is generated; APPS with two of its three difficulties)."""
  if task.name not in BUILDERS or task.name == "prm800k":
    return None
  name = f"restem_{task.name}:{VERSION}"
  if task.name == "apps":
    diffs = tuple(task.options or apps.DIFFICULTIES)
    if set(diffs) == set(apps.DIFFICULTIES):
      return f"restem_apps/all:{VERSION}"
    return f"restem_apps/{diffs[0]}:{VERSION}" if len(set(diffs)) == 1 else None
  return name


def split_map(task: common.Task) -> dict:
  """The task's split names -> TFDS splits (GSM8K's train_all is train+validation)."""
  return {s: "train+validation" if (task.name, s) == ("gsm8k", "train_all") else s for s in task.splits}
