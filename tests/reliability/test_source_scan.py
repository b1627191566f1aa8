"""No load path runs code: a scan of kedit's own source (kedit_core/ and the built-in plugins) for the
constructs that would (docs/RELIABILITY.md, "Security")."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = (REPO / "kedit_core", REPO / "plugins")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def findings(source: str, filename: str = "<source>") -> list[str]:
    """Every construct that could run code from a file or string, as ``file:line: what``."""
    out = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad = [n for n in names if n.split(".")[0] in UNSAFE_MODULES]
            if bad:
                out.append(f"{where}: imports {bad[0]} (deserialising it can run code)")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "compile", "__import__"):
                out.append(f"{where}: calls {func.id}()")
            if isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else None
                if func.attr == "load" and owner == "torch" and not _is_true(_keyword(node, "weights_only")):
                    out.append(f"{where}: torch.load without weights_only=True")
                if func.attr == "load" and owner == "yaml":
                    out.append(f"{where}: yaml.load (use yaml.safe_load)")
                if func.attr == "load" and owner in ("np", "numpy") and _is_true(_keyword(node, "allow_pickle")):
                    out.append(f"{where}: numpy load with allow_pickle=True")
            if _is_true(_keyword(node, "trust_remote_code")):
                out.append(f"{where}: trust_remote_code=True")
            if _is_true(_keyword(node, "shell")):
                out.append(f"{where}: a subprocess with shell=True")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            defaults = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            defaults += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in defaults:
                if arg.arg == "trust_remote_code" and not (isinstance(default, ast.Constant) and default.value is False):
                    out.append(f"{where}: {node.name}() defaults trust_remote_code to {ast.unparse(default)}")
    return out


def package_files() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in d.rglob("*.py"))


def test_the_package_has_no_construct_that_runs_code_from_data():
    files = package_files()
    assert len(files) > 50                                    # the scan really reads the package
    problems = [f for path in files for f in findings(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert problems == []


def test_the_scan_finds_each_construct():
    snippet = '''
import pickle
from joblib import load
import torch, yaml, numpy as np, subprocess
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
yaml.load(open("c"))
np.load("a.npy", allow_pickle=True)
eval("1 + 1")
exec("x = 1")
AutoModel.from_pretrained("m", trust_remote_code=True)
subprocess.run("ls", shell=True)
def load_model(name, trust_remote_code=True): ...
def other(name, *, trust_remote_code=None): ...
model.eval()
torch.load("x.pt", weights_only=True)
'''
    found = findings(snippet)
    assert len(found) == 12, found
    assert not any(":16:" in f or ":17:" in f for f in found)   # model.eval() and a safe torch.load are fine
