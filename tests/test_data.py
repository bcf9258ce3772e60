"""Tasks and TFDS builders: determinism, splits, difficulty, verifiers, and GSM8K from a local fixture."""

import json

import numpy as np
import pytest

from kljax import data, rewards
from kljax.data import tasks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_arithmetic_builder_is_deterministic_with_distinct_splits(data_dir, tmp_path):
  train = data.load("arithmetic/level2", "train", data_dir=data_dir)
  again = data.load("arithmetic/level2", "train", data_dir=str(tmp_path))  # built from scratch
  test = data.load("arithmetic/level2", "test", data_dir=data_dir)
  assert (len(train), len(test)) == (20_000, 1_000)
  assert [train[i] for i in range(50)] == [again[i] for i in range(50)]
  train_q = {train[i]["question"] for i in range(2000)}
  assert len(train_q & {test[i]["question"] for i in range(1000)}) < 100  # different seeds
  for i in range(200):  # answers are right, operands have at most 2 digits
    ex = train[i]
    assert str(eval(ex["question"][:-1])) == ex["answer"]  # noqa: S307 - our own digits-and-ops text
    assert max(len(x) for x in ex["question"][:-1].replace("-", "+").split("+")) <= 2


def test_difficulty_levels_grow():
  for level in tasks.ARITHMETIC_LEVELS:
    exs = list(tasks.arithmetic(0, 300, level))
    widths = [len(e["question"].rstrip("=").replace("*", "+").replace("-", "+").split("+")[0])
              for e in exs]
    assert max(widths) == level
  assert any("*" in e["question"] for e in tasks.arithmetic(0, 100, 3))
  assert not any("*" in e["question"] for e in tasks.arithmetic(0, 100, 2))


def test_countdown_examples_are_solvable_and_checked(data_dir):
  source = data.load("countdown/n4", "train", data_dir=data_dir)
  for i in range(300):
    ex = source[i]
    nums = [int(x) for x in ex["numbers"].split()]
    assert len(nums) == 4 and tasks.countdown_check(ex["answer"], nums, int(ex["target"]))
  assert tasks.countdown_check("(3+5)*2", [3, 5, 2], 16)
  assert not tasks.countdown_check("3*3", [3, 5], 9)  # 3 used twice
  assert not tasks.countdown_check("3+5", [3, 5], 9)  # wrong value
  assert not tasks.countdown_check("__import__('os')", [1], 1)  # only arithmetic is evaluated
  assert tasks.countdown_check("8/2+1", [8, 2, 1], 5)


GSM8K_FIXTURE = [
    {"question": "Tom has 3 apples and buys 4 more. How many?",
     "answer": "He has 3+4=<<3+4=7>>7 apples.\n#### 7"},
    {"question": "A shop sells 1,200 pens a day for 2 days.",
     "answer": "1,200*2=<<1200*2=2400>>2400\n#### 2,400"},
    {"question": "Half of 7?", "answer": "7/2=3.5\n#### 3.5"},
]


def test_gsm8k_from_a_local_fixture_in_the_record_format(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for split, rows in {"train": GSM8K_FIXTURE, "test": GSM8K_FIXTURE[:1]}.items():
    (manual / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  source = data.load("gsm8k", "train", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  assert len(source) == 3
  got = sorted((source[i]["question"], source[i]["answer"]) for i in range(3))
  assert [a for _, a in got] == ["2400", "7/2", "7"]  # sorted by question: "A shop", "Half", "Tom"
  # the reward accepts any numerically equal final answer
  assert rewards.numeric_match(["q"], ["... so #### 3.50"], answer=["7/2"]) == [1.0]
  assert len(data.load("gsm8k", "test", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))) == 1


def test_openr1_math_from_local_parquet_and_jsonl(tmp_path):
  """The OpenR1-Math builder on files in its source format: parquet (with the extra columns the
  real files have) and JSONL; non-numeric answers are dropped; test is a fixed 2% by uuid hash."""
  import zlib

  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = [{"problem": f"What is {i} + {i}?", "solution": f"{i}+{i}=\\boxed{{{2 * i}}}",
           "answer": str(2 * i), "uuid": f"u{i}", "generations": ["long text"] * 2}
          for i in range(200)]
  rows += [{"problem": "Solve x^2 < 1.", "solution": "...", "answer": "(-1, 1)", "uuid": "v0",
            "generations": []},
           {"problem": "Half of 7?", "solution": "...", "answer": "3.50", "uuid": "v1",
            "generations": []}]
  manual = tmp_path / "manual"
  manual.mkdir()
  pq.write_table(pa.Table.from_pylist(rows[:150]), manual / "train-00000-of-00002.parquet",
                 row_group_size=64)
  (manual / "train-00001-of-00002.jsonl").write_text(
      "".join(json.dumps({k: v for k, v in r.items() if k != "generations"}) + "\n"
              for r in rows[150:]))
  kw = dict(data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  train, test = data.load("openr1_math", "train", **kw), data.load("openr1_math", "test", **kw)
  numeric = [r for r in rows if r["answer"] != "(-1, 1)"]
  want_test = {r["problem"] for r in numeric if zlib.crc32(r["uuid"].encode()) % 50 == 0}
  assert len(train) + len(test) == len(numeric) == 201
  assert {test[i]["question"] for i in range(len(test))} == want_test and want_test
  answers = {s[i]["question"]: s[i]["answer"] for s in (train, test) for i in range(len(s))}
  assert answers["Half of 7?"] == "7/2" and answers["What is 3 + 3?"] == "6"
  assert "Solve x^2 < 1." not in answers


def test_batch_indices_are_epoch_permutations_and_resumable():
  size, bs = 10, 3
  first_epoch = np.concatenate([data.batch_indices(size, bs, s, seed=0) for s in range(3)])
  assert len(set(first_epoch)) == 9  # no repeats within an epoch
  second = np.concatenate([data.batch_indices(size, bs, s, seed=0) for s in range(3, 6)])
  assert not np.array_equal(first_epoch, second)  # a new permutation each epoch
  np.testing.assert_array_equal(data.batch_indices(size, bs, 4, seed=0),
                                data.batch_indices(size, bs, 4, seed=0))
  with pytest.raises(ValueError, match="batch_size 11 exceeds the dataset size 10"):
    data.batch_indices(size, 11, 0, seed=0)


def test_bad_requests(data_dir):
  with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
    data.load("mnist", "train", data_dir=data_dir)
  with pytest.raises(ValueError, match="needs a config, one of level1, .* got 'level9'"):
    data.load("arithmetic/level9", "train", data_dir=data_dir)
  with pytest.raises(ValueError, match="has splits .*not 'validation'"):
    data.load("arithmetic/level2", "validation", data_dir=data_dir)
  with pytest.raises(ValueError, match=r"level must be one of \(1, 2, 3, 4, 5\), got 7"):
    tasks.arithmetic_example(np.random.default_rng(0), 7)
