"""The house rules of issue 15, checked on the code itself: no import cycle, no function over 7 parameters,
no module-level mutable state consulted by the attention function, two models recording independently, and a
new task in one module."""
import ast
import json
from pathlib import Path

import torch

import headscope
from headscope.attention import kv, masking, recorder, runstate
from headscope.cli.commands import main
from headscope.families.toy import tiny_model

PACKAGE = Path(headscope.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules this one imports (function-level imports too; TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found |= submodules | ({base} & known if len(submodules) < len(node.names) else set())
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & known
    return found - {name}


def test_the_import_graph_has_no_cycle():
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    state, cycles = {}, []

    def visit(name, trail):
        state[name] = "open"
        for target in graph[name]:
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)
    assert "headscope.scorers.base" in graph["headscope.scorers"]  # the walk sees the package's edges


def test_no_function_takes_more_than_seven_parameters():
    too_many = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
                if len(names) > 7:
                    too_many.append(f"{path.name}:{node.lineno} {node.name} ({len(names)})")
    assert not too_many


def test_the_attention_function_consults_no_module_level_mutable_state():
    """Every module-level value of the modules the attention function reads is immutable (or a function,
    class or module): what it records and masks comes from the model's run state."""
    for module in (recorder, masking, runstate, kv):
        for name, value in vars(module).items():
            if name.startswith("__") or name == "annotations" or callable(value) or type(value).__name__ == "module":
                continue
            assert isinstance(value, (str, int, float, frozenset, tuple)), f"{module.__name__}.{name}"


def test_two_models_record_and_mask_independently():
    """Two models recording at once each get their own rows, as when recorded alone; masking one leaves the
    other untouched."""
    from headscope.detection.decode import fresh_cache

    torch.manual_seed(0)
    ids = torch.randint(4, 256, (1, 20))
    models = [tiny_model("llama", seed=1), tiny_model("qwen2", seed=2)]
    for model in models:
        recorder.install(model)

    def prefilled(model):
        cache = fresh_cache(model)
        with torch.no_grad():
            model(ids[:, :-1], **cache)
        return cache

    def step(model, cache):
        return model(ids[:, -1:], position_ids=torch.tensor([[19]]), **cache).logits

    alone = []
    for model in models:
        rec, cache = recorder.Recorder(2, 3), prefilled(model)
        with torch.no_grad(), recorder.recording(model, rec, seq_len=20):
            step(model, cache)
        alone.append(rec.take("cpu"))
    recs, caches = [recorder.Recorder(2, 3), recorder.Recorder(2, 3)], [prefilled(m) for m in models]
    with torch.no_grad(), recorder.recording(models[0], recs[0], seq_len=20), \
            recorder.recording(models[1], recs[1], seq_len=20):
        step(models[1], caches[1])
        step(models[0], caches[0])
    for rec, (values, positions) in zip(recs, alone):
        together = rec.take("cpu")
        assert torch.equal(together[0], values) and torch.equal(together[1], positions)
    with torch.no_grad():
        plain = [model(ids).logits for model in models]
        with masking.ablating(models[1], {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, "zero"):
            masked = [model(ids).logits for model in models]
    assert torch.equal(masked[0], plain[0]) and not torch.allclose(masked[1], plain[1])


def test_a_new_task_is_one_module(toy_dir, tmp_path, capsys):
    import toy_task  # noqa: F401  registers the "copy" task, nothing else

    out = tmp_path / "copy"
    code = main(["detect", "copy", "--model", str(toy_dir), "--out", str(out), "--quiet", "--no-plots",
                 "--words", "red,blue", "--success-threshold", "-1"])
    assert code == 0, capsys.readouterr().err
    samples = out / f"{toy_dir.name}_copy_retrieval_samples.jsonl"  # the files carry the scorer's name
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["copy-red", "copy-blue"] and all(row["span"] for row in rows)
    assert json.loads((out / f"{toy_dir.name}_copy_retrieval_manifest.json").read_text())["options"]["words"] == "red,blue"
