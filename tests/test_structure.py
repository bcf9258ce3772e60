"""The house rules of `kljax/`, checked on its source: no module over 600 lines, no function over
80, no import of a kljax module inside a function (the way an import circle is hidden), and no
import circle among the modules' top-level imports. The trainer's entrance: one launch of
`kljax-grpo` validates its config once, reads its dataset's prompts once and parses its KL term
once; and the trainer never branches on the KL term's kind (`train.objective` does)."""

import ast
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "kljax"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
  """{dotted name: file} of every module of the package."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _trees():
  return {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in _modules().items()}


def test_no_module_is_over_600_lines():
  long = {name: n for name, path in _modules().items()
          if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
  assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_80_lines():
  long = []
  for name, tree in _trees().items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          long.append(f"{name}.{node.name} ({n} lines)")
  assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _imported(node: ast.AST, module: str, modules) -> list[str]:
  """The kljax modules an import statement in `module` imports (a package's name for a name it
  defines, the submodule for a submodule)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.split(".")[0] == "kljax"]
  if not isinstance(node, ast.ImportFrom):
    return []
  if node.level:  # relative: from the module's package
    package = module.split(".")[:len(module.split(".")) - node.level
                                 + (modules[module].name == "__init__.py")]
    base = ".".join(package + ([node.module] if node.module else []))
  else:
    base = node.module or ""
  if base.split(".")[0] != "kljax":
    return []
  return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def test_no_kljax_import_inside_a_function():
  modules, found = _modules(), []
  for name, tree in _trees().items():
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(fn):
        if _imported(node, name, modules):
          found.append(f"{name}:{node.lineno} in {fn.name}")
  assert not found, f"kljax imports inside functions (import at the top, or untie the circle): " \
                    f"{found}"


def test_no_import_circle_among_the_modules():
  modules = _modules()
  graph = {}
  for name, tree in _trees().items():
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    top += [n for n in tree.body if isinstance(n, ast.If) for n in n.body
            if isinstance(n, (ast.Import, ast.ImportFrom))]
    graph[name] = {m for node in top for m in _imported(node, name, modules)
                   if m in modules and m != name}
  # a package's own __init__ importing its submodules is not a circle when they import siblings
  state, cycles = {}, []

  def visit(n, stack):
    state[n] = "open"
    for m in sorted(graph[n]):
      if state.get(m) == "open":
        cycles.append(stack[stack.index(m):] + [m])
      elif m not in state:
        visit(m, stack + [m])
    state[n] = "done"

  for n in sorted(graph):
    if n not in state:
      visit(n, [n])
  # `import kljax.x` runs kljax/__init__ first, which imports x's siblings: an edge into the
  # package itself from one of its submodules is how Python packages work, not a circle.
  into_package = lambda a, b: b == a.rpartition(".")[0] or a.startswith(b + ".")  # noqa: E731
  cycles = [c for c in cycles if not any(into_package(a, b) for a, b in zip(c, c[1:]))]
  assert not cycles, f"import circles: {[' -> '.join(c) for c in cycles]}"


_COUNTING_LAUNCH = """
import collections, json, sys
from kljax.train import options, validate
counts = collections.Counter()

def counted(module, name, key):
  fn = getattr(module, name)
  def wrapper(*args, **kwargs):
    counts[key] += 1
    return fn(*args, **kwargs)
  setattr(module, name, wrapper)

counted(validate, "_check_names", "validate")  # every validate() calls it once
counted(validate, "_scan_train", "prompt_scan")  # every check_prompt_lengths() calls it once
counted(validate, "kl_term", "kl_term")
counted(options, "kl_term", "kl_term")
counted(validate, "make_mesh", "mesh")
from kljax import cli_grpo
sys.argv = ["kljax-grpo"] + sys.argv[1:]
try:
  cli_grpo.run()
finally:
  print("COUNTS " + json.dumps(counts), flush=True)
"""


def test_a_launch_validates_its_config_once(data_dir, tmp_path):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  flags = [f"--workdir={tmp_path / 'run'}", f"--config={REPO / 'configs' / 'grpo_tiny.py'}",
           f"--config.data.data_dir={data_dir}", "--config.num_steps=2",
           "--config.sft.steps=2", "--config.sft.batch_size=16", "--config.batch_size=16",
           "--config.rollout.group_size=4", "--config.rollout.max_new_tokens=3",
           "--config.mesh.devices=1", "--config.metrics.tensorboard=False",
           # lists on the command line as a,b
           "--config.reward.fns=numeric_match,numeric_match", "--config.reward.weights=0.5,0.5"]
  out = subprocess.run([sys.executable, "-c", _COUNTING_LAUNCH, *flags], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  counts = json.loads(out.stdout.split("COUNTS ", 1)[1])
  assert counts == {"validate": 1, "prompt_scan": 1, "kl_term": 1, "mesh": 1}, counts
  recorded = json.loads((tmp_path / "run" / "config.json").read_text())
  assert recorded["reward"]["fns"] == ["numeric_match", "numeric_match"]
  assert recorded["reward"]["weights"] == [0.5, 0.5]


def test_list_fields_read_as_lists_and_as_comma_strings():
  from kljax.train import options
  from kljax.train.config import grpo_tiny

  assert options.as_names("a, b") == ("a", "b")
  assert options.as_names(("a,b", "c")) == ("a", "b", "c")  # --config.reward.fns=a,b gives ("a,b",)
  assert options.as_numbers("1.0,0.1") == (1.0, 0.1)
  c = grpo_tiny()
  del c.reward["weights"]  # a field a config lacks takes the default of train/config.py
  o = options.Options.of(c)
  assert o.reward.fns == ("numeric_match",) and o.reward.weights == (1.0,)
  assert o.update.on_policy and o.uses_reference and o.max_len == 8 + 4


def test_the_trainer_never_looks_at_the_kl_terms_kind():
  """The stages ask the run's `train.objective.KLObjective`; the kind of term (placement, top-k,
  direction, reward stage) is read where the objective is built, nowhere else in the trainer."""
  kinds = ("placement", "FullKLTerm", "top_k is", "direction ==", '"before_norm"', '"after_norm"',
           '"full"', '"reward"', "reward_stage ==", "reward_at ==")
  for module in ("grpo.py", "loss.py", "step_metrics.py"):
    code = [line for line in (PACKAGE / "train" / module).read_text().splitlines()
            if not line.lstrip().startswith("#")]
    found = [line.strip() for line in code for k in kinds if k in line]
    assert not found, f"kljax/train/{module} branches on the KL term's kind: {found}"


def test_each_kind_of_term_has_its_objective():
  from kljax.kl import kl_term
  from kljax.train import objective

  def of(name, **kw):
    return objective.of(None if name == "none" else kl_term(name), **kw)

  assert type(of("none", on_policy=True)) is objective.NoKL
  assert type(of("k3_as_loss+ratio", on_policy=False)) is objective.LossKL
  assert type(of("k1_in_reward", on_policy=True, reward_stage="before_norm")) is (
      objective.BeforeNormKL)
  on = of("k1_in_reward_rtg", on_policy=True)
  off = of("k1_in_reward", on_policy=False)
  current = of("k1_in_reward", on_policy=False, reward_at="current")
  assert type(on) is type(off) is type(current) is objective.AfterNormKL
  assert (on.in_loss, off.in_loss, current.in_loss) == (True, False, True)
  full, top = of("exact_rkl_rb", on_policy=False), of("top8_rkl_as_loss", on_policy=True)
  assert type(full) is type(top) is objective.FullKL
  assert full.reference_states and full.exact_columns and not top.exact_columns
  assert set(top.batch_extras(0, 3, 5)) == {"kl_seed"} and full.batch_extras(0, 3, 5) == {}
  assert of("k1_in_reward", on_policy=True, reward_stage="before_norm").stats_on_policy
