"""TFDS builders: every split holds the readers' records; the seqio tasks built on them
yield today's examples; the manual directory is read, and bad data names file and line."""
import json

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")  # the accelerator image has no TensorFlow; CI has it
seqio = pytest.importorskip("seqio")

import tasks  # noqa: E402
from tasks import apps, common, prm800k, seqio_tasks  # noqa: E402
from tasks import tfds as restem_tfds  # noqa: E402

pytestmark = pytest.mark.xdist_group("tfds")  # one worker prepares the datasets once


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))


def _reader(name: str, split: str, config: str = "") -> list[dict]:
  data_dir = common.resolve_data_dir()
  if name == "prm800k":
    return prm800k.read(split, data_dir)
  if name == "apps":
    return apps.read(split, data_dir, None if config in ("", "all") else (config,))
  return tasks.TASKS[name].read(split, data_dir, tasks.TASKS[name].options)


@pytest.mark.parametrize("name", ["math", "gsm8k", "humaneval", "apps", "apps/introductory",
                                  "apps/interview", "prm800k"])
def test_every_split_holds_the_readers_records(tfds_dir, name):
  b = restem_tfds.builder(name, data_dir=tfds_dir)
  b.download_and_prepare()
  assert b.info.version == restem_tfds.VERSION and b.info.disable_shuffling
  wants = {split: _reader(name.partition("/")[0], split, name.partition("/")[2]) for split in b.SPLITS}
  assert set(b.info.splits) == {split for split, rows in wants.items() if rows}  # TFDS has no empty split
  unrated = 0
  for split in b.info.splits:
    want = wants[split]
    got = restem_tfds.load(name, split, data_dir=tfds_dir)
    assert b.info.splits[split].num_examples == len(got) == len(want), split
    assert got == want, f"{name}/{split}: the first record that differs: " + next(
        str(i) for i, (g, w) in enumerate(zip(got, want)) if g != w)
    unrated += sum(r is None for rec in got for r in rec.get("ratings", ()))
  assert (unrated > 0) == (name == "prm800k")  # unrated steps come back as None, not as a 0 rating


def test_tfds_load_reads_the_manual_dir_and_names_a_bad_line(tmp_path):
  """The issue's call, with a data folder of our own as the manual directory."""
  rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(7)]
  (tmp_path / "data" / "gsm8k").mkdir(parents=True)
  for split in ("train", "test"):
    with open(tmp_path / "data" / "gsm8k" / f"{split}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows[:5 if split == "train" else 2])
  config = tfds.download.DownloadConfig(manual_dir=str(tmp_path / "data"))
  ds = tfds.load("restem_gsm8k", split="test", data_dir=str(tmp_path / "tfds"),
                 download_and_prepare_kwargs={"download_config": config})
  got = [ex["answer"].decode() for ex in tfds.as_numpy(ds)]
  assert got == ["1", "2"]  # not the 1,319 of the shared data folder
  ds = tfds.load("restem_gsm8k", split="validation", data_dir=str(tmp_path / "tfds"))
  assert len(list(ds)) == 5  # fewer than 500 training problems: all are validation

  bad = tmp_path / "bad" / "gsm8k"  # another folder: the readers cache a folder's files
  bad.mkdir(parents=True)
  for split in ("train", "test"):
    (bad / f"{split}.jsonl").write_text((tmp_path / "data" / "gsm8k" / f"{split}.jsonl").read_text())
  with open(bad / "test.jsonl", "a") as f:
    f.write('{"question": "no answer"}\n')
  with pytest.raises(ValueError, match=r"bad/gsm8k/test.jsonl:3: missing field 'answer'"):
    restem_tfds.builder("gsm8k", data_dir=str(tmp_path / "tfds2"),
                        source_dir=str(tmp_path / "bad")).download_and_prepare()
  with pytest.raises(FileNotFoundError, match="math"):
    restem_tfds.builder("math", data_dir=str(tmp_path / "tfds3"),
                        source_dir=str(tmp_path / "data")).download_and_prepare()


def _examples(task_name: str, split: str) -> list[dict]:
  ds = seqio.get_mixture_or_task(task_name).get_dataset(
      split=split, sequence_length={"inputs": 4096, "targets": 4096}, shuffle=False)
  return [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in ex.items()}
          for ex in ds.as_numpy_iterator()]


@pytest.mark.parametrize("name,prompt", [("gsm8k", None), ("math", None), ("humaneval", None),
                                         ("apps", None), ("gsm8k", "Q: {problem}\nA ({id}):")])
def test_seqio_task_on_tfds_yields_todays_examples(tfds_dir, name, prompt):
  """The default source (TFDS) against the task's reader, every split; a prompt that
  names other fields is rendered from the TFDS record too.  APPS's prompt is a
  function of the record (starter code, call-based or not)."""
  task = tasks.get(name, prompt=prompt)
  on_tfds = seqio_tasks.register(task, name="tfds_" + name, tfds_data_dir=tfds_dir)
  seqio_tasks.register(task, name="reader_" + name, use_tfds=False)
  assert isinstance(on_tfds.source, seqio.TfdsDataSource)
  for split in task.splits:
    got, want = _examples("tfds_" + name, split), _examples("reader_" + name, split)
    assert len(got) == len(task.load(split)) > 0
    assert got == want, split
  assert got[0]["inputs_pretokenized"].decode() == task.load(task.splits[-1])[0]["prompt"]


def test_apps_options_pick_their_config_or_the_reader():
  assert restem_tfds.tfds_name(tasks.get("apps")).startswith("restem_apps/all:")
  assert restem_tfds.tfds_name(tasks.get("apps", options=("interview",))).startswith("restem_apps/interview:")
  assert restem_tfds.tfds_name(tasks.get("apps", options=("interview", "competition"))) is None
  assert restem_tfds.tfds_name(tasks.get("arith")) is None
  assert restem_tfds.split_map(tasks.get("gsm8k"))["train_all"] == "train+validation"
