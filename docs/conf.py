"""Sphinx configuration: the docs/ pages (MyST Markdown) and an API reference from docstrings.

  sphinx-build -W --keep-going -b html docs docs/_build/html

tests/test_docs.py runs exactly this and fails on any warning.
"""

import os
import sys
from pathlib import Path

from sphinx import addnodes
from sphinx.transforms import SphinxTransform

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout's kljax, not another one installed

project = "kljax"
author = "the kljax authors"
copyright = "the kljax authors"  # noqa: A001 (Sphinx's name)

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
# audit_kljax_k3.md is generated with its headings starting at H2: audit_example.md includes it.
exclude_patterns = ["_build", "audit_kljax_k3.md"]

myst_heading_anchors = 3  # `page.md#a-heading` and `#a-heading` resolve, as on GitHub
myst_enable_extensions = ["dollarmath"]
myst_dmath_double_inline = True

html_theme = "alabaster"
html_title = "kljax"
html_static_path: list[str] = []

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False


def _literal_docstring(app, what, name, obj, options, lines):
  """kljax's docstrings are plain text written for `help()`, not reStructuredText (|x|, *, `x`
  would be misparsed): each one is shown as it reads in `help()`, as a literal block."""
  if not any(line.strip() for line in lines):
    lines[:] = []
    return
  body = list(lines)
  lines[:] = ["::", ""] + [f"   {line}" if line.strip() else "" for line in body] + [""]


class _FilesOutsideDocs(SphinxTransform):
  """A Markdown link to a Markdown file outside docs/ (a report under experiments/results/, say)
  links to that file, as on GitHub, instead of being taken for a missing page of the site.

  MyST turns `[x](../a/b.md)` into a page reference whose target is the file's path without its
  suffix (absolute, or relative to docs/, by Sphinx version); such a reference to an existing file
  outside docs/ becomes a download link, which Sphinx copies into the site.
  """

  default_priority = 5

  def apply(self, **kwargs):
    here = Path(self.env.doc2path(self.env.docname)).parent
    for node in list(self.document.findall(addnodes.pending_xref)):
      if node.get("reftype") != "myst" or node.get("refdomain") != "doc":
        continue
      target = node["reftarget"]
      if target in self.env.found_docs:
        continue
      for suffix in self.config.source_suffix:
        path = Path(self.env.srcdir, target + suffix)
        if path.is_file() and DOCS not in path.resolve().parents:
          download = addnodes.download_reference(
              refdoc=self.env.docname, reftype="myst", refexplicit=True,
              reftarget=os.path.relpath(path, here))
          download += node.children
          node.replace_self(download)
          break


def setup(app):
  app.connect("autodoc-process-docstring", _literal_docstring)
  app.add_transform(_FilesOutsideDocs)
  return {"parallel_read_safe": True}
