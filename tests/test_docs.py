"""The documentation: docs/ builds with Sphinx + MyST without a single warning, and every relative
link and image of README.md and docs/*.md points to a file that exists (and to a heading, where
the link names one). External (http) links are not checked: the tests run without a network."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML = re.compile(r"<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[str]:
  """README.md and every Markdown page of docs/, as paths from the repository root."""
  return ["README.md"] + sorted(f"docs/{n}" for n in os.listdir(DOCS) if n.endswith(".md"))


def _prose(text: str) -> str:
  """`text` without fenced code blocks, and with each inline code span's text kept but its
  brackets and parentheses neutral (so `f(x)[0]` is never read as a link)."""
  text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
  return _CODE.sub(lambda m: re.sub(r"[\[\]()]", "", m.group(0).strip("`")), text)


def slug(heading: str) -> str:
  """The anchor GitHub (and MyST's `myst_heading_anchors`) gives a heading's text."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
  text = text.replace("`", "")
  return re.sub(r"[^\w\- ]", "", text.lower().replace(" ", "-"))


def anchors(text: str) -> set[str]:
  """The heading anchors of a Markdown text (a repeated heading gets -1, -2, ... as on GitHub)."""
  seen: dict[str, int] = {}
  out = set()
  for m in _HEADING.finditer(_FENCE.sub("", text)):
    s = slug(m.group(2))
    n = seen.get(s, 0)
    seen[s] = n + 1
    out.add(s if n == 0 else f"{s}-{n}")
  return out


def links(text: str) -> list[str]:
  """Every link and image target of a Markdown text, outside code."""
  prose = _prose(text)
  return _LINK.findall(prose) + _HTML.findall(prose)


def broken_links(path: str, root: str = ROOT) -> list[str]:
  """'FILE: TARGET (why)' for each relative link or image of `path` (from `root`) that points to
  no file, or to a heading that the Markdown file it names does not have."""
  with open(os.path.join(root, path)) as f:
    text = f.read()
  here = os.path.dirname(os.path.join(root, path))
  out = []
  for target in links(text):
    if _SCHEME.match(target):
      continue  # http(s), mailto: not checked here
    file, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(here, file)) if file else os.path.join(root, path)
    if not os.path.realpath(full).startswith(os.path.realpath(root) + os.sep):
      out.append(f"{path}: {target} (outside the repository)")
    elif not os.path.isfile(full):
      out.append(f"{path}: {target} (no such file" + (": link to a file in it"
                                                      if os.path.isdir(full) else "") + ")")
    elif anchor and full.endswith(".md"):
      with open(full) as f:
        if anchor not in anchors(f.read()):
          out.append(f"{path}: {target} (no heading with anchor #{anchor})")
  return out


def test_every_relative_link_and_image_points_to_an_existing_file_and_heading():
  found = [b for path in markdown_files() for b in broken_links(path)]
  assert found == [], "broken links:\n" + "\n".join(found)
  # the checker reads the links at all
  assert "docs/reproduction.md" in links(open(os.path.join(ROOT, "README.md")).read())


def test_the_link_checker_finds_what_is_broken(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "a.png").write_bytes(b"")
  (tmp_path / "docs" / "p.md").write_text("# A page\n\n## Which KL: `kljax.audit`?\n")
  (tmp_path / "README.md").write_text(
      "# T\n\n## Run it\n\n![ok](a.png) [ok](docs/p.md#which-kl-kljaxaudit) [ok](#run-it)\n"
      "[ok](https://example.org/x.md) `[not a link](nope.md)`\n\n```\n[code](nope.md)\n```\n"
      "![bad](b.png) [bad](docs/p.md#nope) [bad](#nope) [bad](docs) [bad](../x.md)\n")
  assert broken_links("README.md", str(tmp_path)) == [
      "README.md: b.png (no such file)",
      "README.md: docs/p.md#nope (no heading with anchor #nope)",
      "README.md: #nope (no heading with anchor #nope)",
      "README.md: docs (no such file: link to a file in it)",
      "README.md: ../x.md (outside the repository)"]


def test_slugs_are_githubs():
  assert slug("Audit any KL code: `kljax.audit`") == "audit-any-kl-code-kljaxaudit"
  assert slug("Run paths on `gs://`") == "run-paths-on-gs"
  assert slug("Which KL does each choice descend?") == "which-kl-does-each-choice-descend"
  assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


@pytest.mark.slow
def test_the_docs_build_without_a_warning(tmp_path):
  # The documented command; -W makes a warning an error, --keep-going reports every one.
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", DOCS,
       str(tmp_path / "html"), "-d", str(tmp_path / "doctrees")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 0 and "WARNING" not in output and "ERROR" not in output, output
  html = (tmp_path / "html" / "api.html").read_text()
  for module in ("kljax.estimators", "kljax.kl", "kljax.audit", "kljax.train.grpo"):
    assert f'id="module-{module}"' in html, module
  assert 'id="kljax.kl.kl_term"' in html  # members come with their docstrings
  # a generated number block reaches the site
  assert "TV to π* (reverse-KL opt.)" in (tmp_path / "html" / "reproduction.html").read_text()
