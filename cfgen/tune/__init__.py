"""Counterfactual prompt learning on the pair shards (DESIGN §4).

    cfgen train vlm --config pipelines/digits.toml   # the embedded VLM's image tower (LiT)
    cfgen tune      --config pipelines/digits.toml   # zero-shot / CoOp / DiCap, base-to-novel
    cfgen tune      --config pipelines/digits.toml --bench   # feature cache vs re-encoding

One job per module:
    backends.py   frozen VLMs: the embedded MiniLM + image tower, transformers CLIP
    image_tower.py  the embedded VLM's image tower (a small CNN into MiniLM's space)
    vlm.py        its locked-text training (cfgen train vlm)
    prompts.py    CoOp / CoCoOp prompt learners
    losses.py     DiCap (L1 + lambda*L2) and CF-VLM (alpha*L_align + beta*L_csd + gamma*L_fcd)
    features.py   reading the pair shards, the frozen image-feature cache
    protocol.py   base-to-novel split, K shots, accuracies, mean/std over seeds, HM
    train.py      one training run per (method, seed) and `cfgen tune` itself
    bench.py      epoch time with the cache against re-encoding the images
"""
