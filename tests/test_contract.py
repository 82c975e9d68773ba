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


def test_stage_folders_are_the_layout_the_readme_states(tmp_path):
    """Each stage's shards, rows and done markers sit where the README's layout says (literal paths), the
    bookkeeping in `_state/` where pyarrow's and Hugging Face's folder readers do not look for data."""
    from cfgen.contract import GUIDE, INVERT, PAIRS

    run = Path("/x")
    assert PAIRS.tar(run, 7) == Path("/x/pairs/pairs-000007.tar")
    assert PAIRS.rows(run, 7) == Path("/x/pairs/_state/pairs-000007.parquet")
    assert PAIRS.marker(run, 12) == Path("/x/pairs/_state/pairs-000012_stats.json")
    assert GUIDE.tar(run, 0) == Path("/x/guide/guide-000000.tar")
    assert INVERT.marker(run, 3) == Path("/x/invert/_state/invert-000003_stats.json")
    assert set(PAIRS.members) == set(PAIR_MEMBERS)
    assert set(INVERT.members) == {"json", "noise.npy", "png"}
    assert set(GUIDE.members) == {"cf.png", "json", "png", "recon.png"}

    # done = a marker in _state/ with a six-digit index; nothing else counts
    (tmp_path / "pairs" / "_state").mkdir(parents=True)
    (tmp_path / "pairs" / "pairs-000007_stats.json").write_text("{}")  # outside _state/: not a marker
    for name in ["pairs-000000_stats.json", "pairs-000003_stats.json", "pairs-000012_stats.json",
                 "pairs-000001.tar", "pairs-000002.parquet",   # no marker: not done
                 "guide-000004_stats.json",                    # another stage's prefix
                 "pairs-abc_stats.json", "pairs-x-000005_stats.json"]:
        (tmp_path / "pairs" / "_state" / name).write_text("{}")
    assert PAIRS.finished(tmp_path) == [0, 3, 12]
    assert GUIDE.finished(tmp_path) == []      # its own folder is missing
