"""Property-based fuzzing of everything that parses user input: dotted overrides and YAML config
documents (through the config loader and the ``orca`` entry point) and rank-map JSON files.

The property: a generated input either loads or fails with one of our errors (a ConfigError, a
UsageError, a FileReadError) -- never another exception type, which would reach the user as a
traceback. Examples are derandomised (the same inputs on every run, so CI cannot flake) and mix
valid keys with typos, YAML's special syntax (anchors, tags, flow brackets, nan/inf, dates, huge
numbers) and random text.
"""
from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orca import cli
from orca.adapters.config import AdapterConfig
from orca.config import ExperimentConfig, load_config
from orca.errors import FileReadError, OrcaError, UsageError
from orca.schema import ConfigError

FUZZ = settings(max_examples=1000, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _keys(cls, prefix: str = "") -> typing.List[str]:
    """Every dotted key of the schema (with the default task's options), so values meet real fields."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_keys(hints[f.name], f"{key}."))
    return out


KEYS = _keys(ExperimentConfig) + [f"task.options.{f.name}" for f in dataclasses.fields(type(ExperimentConfig().task.options))]
TOKENS = [".nan", ".inf", "-.inf", "nan", "inf", "1e400", "-1", "0", "1", "2.5", "-0.0", "10" * 40, "0x1F", "0o17",
          "1_000", "2:6", "12:30:00", "2026-12-07", "null", "~", "true", "no", "on", "[", "]", "{", "}", "[0.9,",
          "[0.9, 0.98]", "[1, [2, [3]]]", "{a: 1}", "{a: {b: }", "&a [*a]", "*x", "!!python/object:os.system",
          "!!binary aGVsbG8=", "!!set {a, b}", "!!float x", "? x", "- a", "|", ">", "a: b: c", "'open", '"open',
          "\t", "%YAML 1.1", "---", "...", "@", "`", "#comment", "\x00", "é", "[" * 3000 + "]" * 3000]
TEXT = st.lists(st.sampled_from(list("abz019._-:=[]{},'\" \t\n!&*#?|>@%~/\\") + ["nan", "inf", "e5"]),
                max_size=24).map("".join)
VALUE = st.one_of(st.sampled_from(TOKENS), TEXT,
                  st.integers(-10**30, 10**30).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr))
KEY = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + "x"),
                st.sampled_from(KEYS).map(lambda k: k.rsplit(".", 1)[0] + ".."), TEXT)
OVERRIDE = st.one_of(st.tuples(KEY, VALUE).map("=".join), TEXT)

SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.text(max_size=8),
                   st.sampled_from(TOKENS[:20]))
PLAIN = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)),
                                                                     inner, max_size=4)), max_leaves=12)


def _section_doc(data):
    """A mapping shaped like a config: dotted keys nested into sections."""
    out = {}
    for key, value in data.items():
        node = out
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    return out


DOCUMENT = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), PLAIN, max_size=5).map(lambda d: yaml.safe_dump(_section_doc(d))),
    PLAIN.map(yaml.safe_dump),
    st.lists(st.one_of(OVERRIDE.map(lambda o: o.replace("=", ": ", 1)), TEXT), max_size=6).map("\n".join),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
)


def _loads_or_refuses(call):
    try:
        call()
    except (ConfigError, UsageError, FileReadError):
        pass


@FUZZ
@given(overrides=st.lists(OVERRIDE, min_size=1, max_size=3))
def test_overrides_load_or_fail_with_a_config_error(overrides):
    _loads_or_refuses(lambda: load_config(None, overrides))


@FUZZ
@given(document=DOCUMENT, overrides=st.lists(OVERRIDE, max_size=1))
def test_yaml_documents_load_or_fail_with_a_config_error(tmp_path, document, overrides):
    path = tmp_path / "exp.yaml"
    path.write_bytes(document.encode("utf-8", "surrogatepass"))
    _loads_or_refuses(lambda: load_config(str(path), overrides))


# An argument that starts with "-" is a flag, not an override: argparse answers an unknown one with
# its usage and an error line, as every argparse program does.
ARGUMENT = OVERRIDE.filter(lambda o: not o.startswith("-"))


@settings(FUZZ, max_examples=300)
@given(document=DOCUMENT, overrides=st.lists(ARGUMENT, max_size=2))
def test_entry_point_prints_a_config_or_one_error_line(tmp_path, capfd, document, overrides):
    capfd.readouterr()  # fixtures are shared by the examples: start each from empty streams
    path = tmp_path / "exp.yaml"
    path.write_bytes(document.encode("utf-8", "surrogatepass"))
    code = cli.main(["show-config", "--config", str(path), *overrides])
    out, err = capfd.readouterr()
    assert code in (0, 2)
    if code == 0:
        assert isinstance(yaml.safe_load(out), dict) and err == ""
    else:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and out == ""


RANK = st.one_of(st.integers(-3, 70), st.floats(), st.text(max_size=4), st.none(), st.booleans(),
                 st.lists(st.integers(), max_size=2))
RANK_MAP = st.dictionaries(st.one_of(st.sampled_from(["layers.0.blocks.0.attn.qkv", r".*\.attn\.proj", ""]),
                                     st.text(max_size=12)), RANK, max_size=5)
RANK_FILE = st.one_of(
    RANK_MAP.map(lambda m: json.dumps({"rank_map": m, "budget": 1000})),
    st.recursive(st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=6)),
                 lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                 max_leaves=10).map(json.dumps),
    RANK_MAP.map(lambda m: json.dumps({"rank_map": m})).flatmap(lambda t: st.integers(0, len(t)).map(lambda n: t[:n])),
    st.binary(max_size=48).map(lambda b: b.decode("latin-1")),
)


@FUZZ
@given(text=RANK_FILE)
def test_rank_map_files_load_or_fail_naming_the_file(tmp_path, text):
    path = tmp_path / "rank_map.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        ranks = AdapterConfig(method="lora", rank_map=str(path)).load_rank_map()
    except OrcaError as err:
        assert isinstance(err, FileReadError) and err.where == str(path)
    else:
        assert all(isinstance(k, str) and k and isinstance(v, int) and v >= 0 for k, v in ranks.items())
