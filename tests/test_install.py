"""The README's two commands resolve from the public package index alone.

The build machines carry a local wheelhouse (a CPU-only torch) and a pip configuration that users do not
have; these tests switch both off, as a fresh machine would be, and ask pip to resolve what `make demo` and
`make test` install.
"""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_installs(target):
    """The extras `make -n <target>` would pip-install (dry run of make: nothing is executed)."""
    env = dict(os.environ, MAKEFLAGS="")
    out = subprocess.run(
        ["make", "-n", "-B", "-C", REPO, target], capture_output=True, text=True, env=env, check=True
    ).stdout
    return sorted(set(re.findall(r'-e "(\.\[[a-z,_-]+\])"', out)))


def test_demo_installs_only_its_data_extra():
    assert _make_installs("demo") == [".[data]"]


def test_test_installs_test_and_bench_extras():
    assert _make_installs("test") == [".[test,bench]"]


@pytest.mark.slow
@pytest.mark.parametrize("extras", [".[data]", ".[test,bench]"], ids=["demo", "test"])
def test_resolves_from_public_index_only(extras):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_CONSTRAINT="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", extras],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
