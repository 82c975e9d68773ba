"""The contract as README.md states it (tests/contract_spec.py), the README itself, and what may import what."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from contract_spec import PAIR_FIELDS, PAIR_MEMBERS

ROOT = Path(__file__).resolve().parents[1]


def test_readme_contract_table_is_the_spec_the_tests_use():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Output contract"):]
    members = re.findall(r"^\| `K\.([a-z.]+)` \|", section, flags=re.M)
    assert tuple(members) == PAIR_MEMBERS
    fields = re.search(r"^\| `K\.json` \| `([^`]+)`", section, flags=re.M).group(1)
    assert [f.strip() for f in fields.split(",")] == list(PAIR_FIELDS)


def test_verify_imports_neither_torch_nor_diffusers():
    """`cfgen verify` checks shards on any machine: it must not pull the model stack in."""
    code = ("import sys; import cfgen.verify, cfgen.contract, cfgen.errors; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers', "
            "'webdataset', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_verify_runs_without_torch(digits_run):
    """The CLI path too: `cfgen verify` on a real run, with torch made unimportable."""
    run_dir, _ = digits_run
    code = ("import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; "
            "sys.argv = ['cfgen', 'verify', sys.argv[1]]; from cfgen.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "0 problem(s)" in out.stdout
