"""The config schema is the one table of keys: every key the builders and modes read is in it
(found by reading their source), every key has a type, a default of that type and a meaning, and
the generated docs/config.md is current."""

import ast
import importlib.util
import pathlib

import ml_collections
import pytest

from diffusion_jax.builders import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
READERS = sorted((ROOT / "diffusion_jax" / "builders").glob("*.py")) + sorted(
    (ROOT / "diffusion_jax" / "modes").glob("*.py")
)
SECTIONS = {s for s in config_lib.SECTIONS if s}
TOP_LEVEL = {k.name for k in config_lib.SCHEMA if not k.section}
CONFIG_METHODS = set(dir(ml_collections.ConfigDict))


def _is_config(node: ast.AST) -> bool:
    """``config``, ``x.config``, ``with_defaults(config)``: an expression holding a whole config."""
    if isinstance(node, ast.Name):
        return node.id in ("config", "full", "cfg")
    if isinstance(node, ast.Attribute):
        return node.attr == "config"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id == "with_defaults"
    return False


def _section_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and node.attr in SECTIONS and _is_config(node.value):
        return node.attr
    return None


def keys_read(path: pathlib.Path) -> set[str]:
    """Dotted keys read in one module: ``config.section.key``, ``config.key`` and ``name.key``
    where ``name = config.section`` in the same function."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Module))]
    for scope in scopes:
        aliases: dict[str, str] = {}
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign):
                pairs = []
                for target in node.targets:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        pairs += list(zip(target.elts, node.value.elts))
                    else:
                        pairs.append((target, node.value))
                for target, value in pairs:
                    section = _section_of(value)
                    if isinstance(target, ast.Name) and section:
                        aliases[target.id] = section
        for node in ast.walk(scope):
            if not isinstance(node, ast.Attribute) or node.attr in CONFIG_METHODS:
                continue
            section = _section_of(node.value)
            if section:
                found.add(f"{section}.{node.attr}")
            elif isinstance(node.value, ast.Name) and node.value.id in aliases:
                found.add(f"{aliases[node.value.id]}.{node.attr}")
            elif _is_config(node.value) and node.attr not in SECTIONS and node.attr not in ("config",):
                found.add(node.attr)
    return found


def test_every_key_read_by_the_builders_and_modes_is_in_the_schema():
    known = {k.path for k in config_lib.SCHEMA}
    read = {key: path.name for path in READERS for key in keys_read(path)}
    assert len(read) > 100, sorted(read)  # the scan sees the builders' reads
    missing = {k: f for k, f in read.items() if k not in known}
    assert not missing, f"keys read but not in the schema: {missing}"


def test_the_scan_finds_reads_through_aliases(tmp_path):
    src = tmp_path / "reader.py"
    src.write_text(
        "def f(config):\n"
        "    m, t = config.model, config.training\n"
        "    return m.nf, t.foo, config.data.bar, config.seed\n"
    )
    assert keys_read(src) == {"model.nf", "training.foo", "data.bar", "seed"}


@pytest.mark.parametrize("key", config_lib.SCHEMA, ids=[k.path for k in config_lib.SCHEMA])
def test_every_key_has_a_type_a_valid_default_and_a_meaning(key):
    assert key.help and key.kind in ("int", "float", "bool", "str", "ints", "floats")
    assert config_lib._type_ok(key, key.default), (key.path, key.default)
    if key.default is not None and key.check is not None:
        assert key.check(key.default) is None, key.path


def test_overrides_are_typed_by_the_schema():
    parse = config_lib.parse_override
    assert parse("training.batch_size", "64") == 64
    assert parse("optim.lr", "1e-3") == 1e-3
    assert parse("training.snapshot_sampling", "False") is False
    assert parse("model.ch_mult", "(1,)") == (1,)
    assert parse("model.ch_mult", "1,2,2") == (1, 2, 2)
    assert parse("model.attn_resolutions", "()") == ()
    assert parse("sampling.eta", "None") is None
    assert parse("sampling.method", "dpmpp_2m") == "dpmpp_2m"
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'training.batchsize' \(did you mean"):
        parse("training.batchsize", "3")
    with pytest.raises(config_lib.ConfigError, match=r"expected an integer"):
        parse("training.batch_size", "3.5")
    with pytest.raises(config_lib.ConfigError, match=r"expected integers like \(1, 2\)"):
        parse("model.ch_mult", "(1, 'a')")


def test_to_python_round_trips(tmp_path):
    """A resolved config written as a config file loads back to the same config."""
    config = config_lib.load_config(str(ROOT / "configs" / "digits" / "edm.py"))
    config_lib.apply_overrides(config, [("training.batch_size", "32"), ("sampling.eta", "0.5")])
    path = tmp_path / "resolved.py"
    path.write_text(config_lib.to_python(config))
    again = config_lib.load_config(str(path))
    assert config_lib.config_diff(config, again) == []
    assert again.training.batch_size == 32 and again.sampling.eta == 0.5


def test_generated_docs_are_current():
    """docs/config.md and the sampler table of docs/samplers.md are generated from the code
    (python scripts/generate_docs.py)."""
    spec = importlib.util.spec_from_file_location("generate_docs", ROOT / "scripts" / "generate_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path, text in module.generated().items():
        assert path.read_text() == text, f"{path.name} is stale: run python scripts/generate_docs.py"
