"""The models/ boundary (issue 10, design.md §6): everything that knows a model family lives under
xctune/models/; nothing outside it names a family, a family's modules or its presets.

The names are read off the families themselves (every preset's module tree built on `meta`, twins
for the transformers presets), so a family added later is covered without editing this test. A
hit fails with file:line and the name, e.g. `xctune/worlds/real.py:302: 'vit' (a module of ...)`.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xctune"
MODELS = PACKAGE / "models"
# Names of the embedded family that its module tree does not show (the model's own name, its LoRA kind)
EMBEDDED_FAMILY_WORDS = ("IXC", "InternLM", "XComposer", "PLoRA")
# Unit-name parts that are plain structural words of every decoder model (and of English): they
# name a family only as a whole string literal (`"output"` as a unit), not as a word in prose or
# a local variable name ("the root's output", `for layer in layers`)
GENERIC_PARTS = frozenset({"model", "layers", "norm", "output", "visual", "connector"})
# The modules of models/ that the rest may import: the one interface, no family's own module
INTERFACE_MODULES = frozenset({"base", "profile", "families", "loading", "presets", "engines"})


@cache
def family_names() -> tuple[dict[str, str], dict[str, str]]:
    """({family name: what it is}, {module name: what it is}) for every family the models package
    defines: family, class and preset names; unit paths, their parts and the family's own
    parameter kinds (Plora_A)."""
    from xctune.models.config import PRESETS
    from xctune.models.families import family_of
    from xctune.models.hf.config import PRESET_NAMES, get_preset

    families: dict[str, str] = {w: "the embedded family's name" for w in EMBEDDED_FAMILY_WORDS}
    modules: dict[str, str] = {}
    configs = list(PRESETS.values()) + [family_of(get_preset(n)).twin() for n in PRESET_NAMES]
    for n in (*PRESETS, *PRESET_NAMES):
        families[n] = "a model preset"
    for cfg in configs:
        family = family_of(cfg)
        model = family.build_meta()
        for cls in (type(model), type(family), type(cfg)):
            families[cls.__name__] = f"a class of the {cfg.name} family"
        model_type = getattr(cfg, "model_type", None)
        if model_type:  # transformers' family word: llava, qwen, idefics, paligemma, mllama, ...
            families[re.match(r"[a-z]+", model_type).group()] = f"the transformers family of {cfg.name}"
        for unit in family.units(model):
            modules[unit.name] = f"a module of {cfg.name}"
            for part in unit.name.split("."):
                if not part.isdigit() and part not in GENERIC_PARTS:
                    modules.setdefault(part, f"a module of {cfg.name}")
        for pname, _ in model.named_parameters():  # the family's own parameter kinds (Plora_A, ...)
            for part in pname.split(".")[:-1]:
                if "_" in part and any(c.isupper() for c in part):
                    modules.setdefault(part, f"a module of {cfg.name}")
    return families, modules


def _word_regex(words, flags=0) -> re.Pattern:
    """Any of `words`, not inside a longer identifier; a version may follow (qwen2_vl, Gemma3, ixc2-vl-7b)."""
    alternatives = sorted(words, key=len, reverse=True)
    return re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, alternatives)) + r")(?![A-Za-z_])", flags)


@cache
def _patterns() -> tuple[list[tuple[re.Pattern, dict[str, str]]], dict[str, str]]:
    """([(regex, {matched text (lowered where case-insensitive): what it is})], {whole string literal:
    what it is}). Family, class and preset names match anywhere on a line (code, strings, comments,
    docstrings) in any case; module names in their own case (`Role.VISION_TOWER` is the interface's
    word, `vision_tower` a module). A dotted unit path, a unit that is a plain word (`output`) and a
    preset that is one (`tiny`) match as a whole string literal only."""
    families, modules = family_names()
    literals, family_words, module_words = {}, {}, {}
    for name, what in families.items():
        if name.isalpha() and name.islower() and what == "a model preset":  # tiny
            literals[name] = what
        else:
            family_words[name.lower()] = what
    for name, what in modules.items():
        if "." in name or name in GENERIC_PARTS:
            literals[name] = what
        else:
            module_words[name] = what
    return [(_word_regex(family_words, re.I), family_words), (_word_regex(module_words), module_words)], literals


def _files():
    for path in sorted(PACKAGE.rglob("*.py")):
        if MODELS not in path.parents:
            yield path


def boundary_violations(files=None) -> list[str]:
    """Every family name in `files` (default: the package outside models/), as 'file:line: name (what)'."""
    regexes, literals = _patterns()
    hits = []
    for path in files or _files():
        text = path.read_text()
        rel = path.relative_to(PACKAGE.parent) if PACKAGE in path.parents else path.name
        for lineno, line in enumerate(text.splitlines(), 1):
            for regex, words in regexes:
                for m in regex.finditer(line):
                    what = words.get(m.group(1)) or words[m.group(1).lower()]
                    hits.append(f"{rel}:{lineno}: {m.group(1)!r} ({what})")
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type != tokenize.STRING:
                continue
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):  # an f-string: its text between the quotes
                value = tok.string.split(tok.string[-1], 1)[-1].rstrip(tok.string[-1])
            if isinstance(value, str) and value in literals:
                hits.append(f"{rel}:{tok.start[0]}: {value!r} ({literals[value]})")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = _absolute(node, path)
                parts = module.split(".")
                if parts[:2] == ["xctune", "models"]:
                    inside = parts[2] if len(parts) > 2 else None
                    if inside not in INTERFACE_MODULES:
                        what = ", ".join(a.name for a in node.names)
                        hits.append(f"{rel}:{node.lineno}: imports {what} from {module} (a family's own module; "
                                    f"the interface is models.{{{', '.join(sorted(INTERFACE_MODULES))}}})")
    return sorted(set(hits))


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def test_nothing_outside_models_names_a_family():
    hits = boundary_violations()
    assert not hits, "names of a model family outside xctune/models/:\n" + "\n".join(hits)


def test_the_scan_finds_each_kind_of_name(tmp_path):
    """The scan is not blind: a module of each kind of naming is caught, with its line."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        '"""Runs the vision_proj of InternLM-XComposer on qwen2-vl-7b."""\n'
        "from xctune.models.ixc import IXCFamily\n"
        "x = model.model.tok_embeddings(ids)  # then lm_head\n"
        "kind = 'output'\n"
        "name = f'model.norm'\n"
        "PaliGemmaForConditionalGeneration = Qwen2VL = None\n"
        "ok = 'the output of the model'  # plain words in prose are not names\n"
    )
    hits = "\n".join(boundary_violations([bad]))
    for line, name in [(1, "vision_proj"), (1, "InternLM"), (1, "XComposer"), (1, "qwen2-vl-7b"), (2, "IXCFamily"),
                       (3, "tok_embeddings"), (3, "lm_head"), (4, "output"), (5, "model.norm"),
                       (6, "PaliGemmaForConditionalGeneration"), (6, "Qwen")]:
        assert f"bad.py:{line}: {name!r}" in hits, (name, hits)
    assert "bad.py:2: imports IXCFamily from xctune.models.ixc" in hits
    assert "bad.py:7" not in hits
