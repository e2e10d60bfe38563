"""The suite's own rules: every test runs from the checkout alone, and no test is skipped silently."""

import shutil
import subprocess
import sys

from conftest import FIELD, ROOT

DEMO = '''
import pytest

def test_skipped_without_a_declared_reason():
    pytest.skip("field map not present")

@pytest.mark.may_skip("no PostgreSQL server")
def test_skipped_for_a_declared_reason():
    pytest.skip("no PostgreSQL server on 127.0.0.1")

@pytest.mark.skipif(True, reason="declared by its marker")
def test_skipped_by_a_marker():
    pass

def test_runs():
    pass
'''


def _pytest(folder, *args):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder), *args],
                          capture_output=True, text=True, cwd=folder, timeout=120)


def test_strict_skips_fail_only_undeclared_reasons(tmp_path):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_demo.py").write_text(DEMO)
    strict = _pytest(tmp_path, "--strict-skips")
    assert strict.returncode == 1, strict.stdout
    assert "test_demo.py::test_skipped_without_a_declared_reason: field map not present" in strict.stdout
    assert "for_a_declared_reason:" not in strict.stdout and "by_a_marker:" not in strict.stdout
    assert "1 passed, 3 skipped" in strict.stdout.splitlines()[-1]  # pytest's own summary stays the last line
    (tmp_path / "test_demo.py").write_text(DEMO.replace('pytest.skip("field map not present")', "pass"))
    assert _pytest(tmp_path, "--strict-skips").returncode == 0
    assert _pytest(tmp_path).returncode == 0


def test_the_field_maps_are_part_of_the_checkout():
    names = sorted(p.name for p in FIELD.glob("*.json"))
    assert names == ["ixc2-vl-7b.authors-heuristic.2gpu.json", "ixc2-vl-7b.authors-heuristic.4gpu.json",
                     "ixc2-vl-7b.split-vision-from-embeddings.2gpu.json"]
    assert FIELD.is_relative_to(ROOT / "tests")
