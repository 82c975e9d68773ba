"""Per-pair measures, used while pairs are made and packed: distances (L1/L2), quality beyond them and the
pack gates (measures.py), CLD (cld.py), and where `cfgen evaluate`'s judge.json lives (judge_record.py)."""
