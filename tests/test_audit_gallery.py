"""The gallery of other frameworks' KL terms: each audits to its hand-derived on-policy verdict.

The expectations in `kljax.audit.gallery.GALLERY` come from a hand derivation of the on-policy
one-token gradient coefficient (see that module's docstring); the audit measures the same thing by
exact enumeration, so the two are independent.
"""

import re

import pytest

from kljax import audit
from kljax.audit.gallery import GALLERY, Entry

_VERDICTS = {"reverse": "∇RKL", "forward": "∇FKL", "zero": "0", "biased": "biased"}
_ONE_TOKEN_ON_POLICY = (audit.SETTINGS[0],)


def _id(entry: Entry) -> str:
  return f"{entry.framework}: {entry.option}"


@pytest.mark.parametrize("entry", GALLERY, ids=_id)
def test_on_policy_one_token_verdict(entry):
  report = audit.audit(entry.impl, settings=_ONE_TOKEN_ON_POLICY)
  assert report.on_policy == _VERDICTS[entry.expected], (
      f"{_id(entry)}: expected {entry.expected} ({entry.reason}), audit says "
      f"{report.settings[0].verdict}\n\n{report.markdown()}")


@pytest.mark.parametrize("entry", GALLERY, ids=_id)
def test_entry_is_complete_and_cites_a_source_file(entry):
  assert isinstance(entry.impl, audit.Implementation)
  assert entry.expected in _VERDICTS
  for field in ("framework", "option", "computes", "reason", "source"):
    assert getattr(entry, field).strip(), f"{_id(entry)}: empty {field}"
  # A version (a commit, or a release read from its published package) and a file path inside
  # the framework's package or repository.
  assert re.search(r"commit [0-9a-f]{7}|\b\d+\.\d+\.\d+ \(PyPI", entry.source), entry.source
  assert re.search(r"[\w.-]+(/[\w.-]+)+\.(py|ya?ml)\b", entry.source), entry.source


def test_gallery_covers_the_frameworks():
  frameworks = {e.framework for e in GALLERY}
  assert {"verl", "TRL", "OpenRLHF", "NeMo-RL", "tunix", "MaxText", "slime", "ROLL",
          "SkyRL"} <= frameworks
  names = [e.impl.name for e in GALLERY]
  assert len(names) == len(set(names)), "implementation names must be unique"
