"""Read the pair shards and cache the frozen image features, once per (shard, model).

The image encoder is frozen, so every factual and counterfactual image is
encoded once and stored under

    RUN/tune/cache/<model_id>/<shard stem>-<size>-<mtime_ns>.safetensors

(`feat`, `cf_feat`, `label`, `cf_label`; sample ids and class names in the
metadata). A shard that changes gets a new key; the stale entry of that shard
is removed. Epochs then cost only the text side (see bench.py).

Images that are not in the shards -- the data source's evaluation split, the
real images the `nearest` counterfactuals are drawn from, the causal model's
true counterfactuals -- are cached the same way, as a named set:

    RUN/tune/cache/<model_id>/sets/<name>-<fingerprint>.safetensors

where the fingerprint is a sha1 over what decides the pixels (the data config,
the source module's code, every sample's id / label / origin and, for files,
size and mtime): another sample list, source or model is another entry.

    urls = expand_urls("runs/digits/pairs/pairs-{000000..000003}.tar")
    pairs = load_pair_features(urls, vlm, cache_dir=Path("runs/digits/tune/cache"))
    feats = load_image_set("eval-test", refs_fingerprint(cfg, refs), ids, loaders, vlm, cache_dir)
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cfgen.contract import PAIRS, image_keys
from cfgen.data.images import decode_png
from cfgen.errors import ImageDecodeError, InputError, ShardError
from cfgen.shards import read_samples
from cfgen.tune.backends import VLM


def expand_urls(spec: str | list[str]) -> list[Path]:
    """Pair shards named by a path, a glob or a brace-expanded list (webdataset's URL syntax)."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[Path] = []
    for s in specs:
        for item in braceexpand(s.strip()):
            matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
            out += [Path(m) for m in matches]
    if not out:
        raise InputError(f"no pair shards match {spec!r}")
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise InputError(f"pair shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return list(dict.fromkeys(out))


@dataclass
class ShardImages:
    """The decoded pairs of one shard."""

    ids: list[str]
    factual_ids: list[str]  # the input sample each pair was made from (K.json factual_id; several pairs may share one)
    images: np.ndarray  # uint8 (N, H, W, C)
    cf_images: np.ndarray
    label: np.ndarray  # int64 (N,)
    cf_label: np.ndarray
    names: dict[int, str]
    interventions: list[str] = field(default_factory=list)
    """K.json intervention of each pair, 'do(environment=grass)' ('' where the shard has none)."""


def read_shard_images(path: Path) -> ShardImages:
    """Decode a pair shard (contract.PAIRS)."""
    ids, factual_ids, images, cf_images, labels, cf_labels, names, dos = [], [], [], [], [], [], {}, []
    for sample in read_samples(path):
        try:  # the image members carry pack.image_format's extension (png, jpg, webp)
            image, cf_image = image_keys(sample)
        except KeyError as exc:
            raise ShardError(f"{path.name}: sample {sample['__key__']}: {exc.args[0]}; not a pair shard") from None
        missing = [m for m in PAIRS.members if not m.endswith("png") and m not in sample] + \
            [m for m in (cf_image,) if m not in sample]
        if missing:
            raise ShardError(f"{path.name}: sample {sample['__key__']} lacks {', '.join(missing)}; not a pair shard")
        meta = json.loads(sample["json"])
        y, ycf = int(sample["cls"]), int(sample["cf.cls"])
        names.setdefault(y, str(meta.get("label_name", y)))
        names.setdefault(ycf, str(meta.get("cf_label_name", ycf)))
        ids.append(sample["__key__"])
        factual_ids.append(str(meta.get("factual_id", sample["__key__"])))  # contract v2 shards: the key
        images.append(decode_png(sample[image]))
        cf_images.append(decode_png(sample[cf_image]))
        labels.append(y)
        cf_labels.append(ycf)
        dos.append(str(meta.get("intervention") or ""))
    if not ids:
        raise ShardError(f"{path.name}: no pairs in this shard")
    try:
        return ShardImages(ids, factual_ids, np.stack(images), np.stack(cf_images), np.array(labels, dtype=np.int64),
                           np.array(cf_labels, dtype=np.int64), names, dos)
    except ValueError:
        raise ShardError(f"{path.name}: images of different sizes in one shard") from None


@torch.no_grad()
def encode_images(vlm: VLM, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Frozen image features (N, D), float32 on the CPU."""
    out = [vlm.encode_images(images[i: i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@dataclass
class PairFeatures:
    """Frozen features of every pair of a set of shards, in shard order."""

    ids: list[str]
    factual_ids: list[str]  # per pair, the input sample it was made from: what splits and sources know
    feat: torch.Tensor  # (N, D) factual images
    cf_feat: torch.Tensor  # (N, D) counterfactual images
    label: torch.Tensor  # (N,) long
    cf_label: torch.Tensor
    names: dict[int, str]
    stats: dict = field(default_factory=dict)
    """cache hits / misses and the seconds spent reading + encoding."""
    interventions: list[str] = field(default_factory=list)
    """Per pair its do(), 'do(environment=grass)': what a cue flip's true counterfactual renders."""

    def do_of(self, i: int) -> tuple[str, str] | None:
        """(concept, value) of pair i's intervention, None if it has none."""
        text = self.interventions[i] if i < len(self.interventions) else ""
        if not (text.startswith("do(") and text.endswith(")") and "=" in text):
            return None
        concept, _, value = text[3:-1].partition("=")
        return concept, value


def cache_file(cache_dir: Path, model_id: str, shard: Path) -> Path:
    st = shard.stat()
    return cache_dir / model_id / f"{shard.stem}-{st.st_size}-{st.st_mtime_ns}.safetensors"


def _encode_shard(vlm: VLM, shard: Path, batch_size: int) -> dict:
    data = read_shard_images(shard)
    return {"ids": data.ids, "factual_ids": data.factual_ids, "names": data.names, "interventions": data.interventions,
            "feat": encode_images(vlm, data.images, batch_size), "cf_feat": encode_images(vlm, data.cf_images, batch_size),
            "label": torch.from_numpy(data.label), "cf_label": torch.from_numpy(data.cf_label)}


def _save(path: Path, part: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name.rsplit("-", 2)[0]
    for stale in path.parent.glob(f"{glob.escape(stem)}-*.safetensors"):
        if stale.name.rsplit("-", 2)[0] == stem:
            stale.unlink(missing_ok=True)  # the same shard under an older size/mtime
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: part[k].contiguous() for k in ("feat", "cf_feat", "label", "cf_label")}
    save_file(tensors, str(tmp), metadata={"ids": json.dumps(part["ids"]), "factual_ids": json.dumps(part["factual_ids"]),
                                           "interventions": json.dumps(part["interventions"]),
                                           "names": json.dumps({str(k): v for k, v in part["names"].items()})})
    tmp.replace(path)


def _load(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    part = load_file(str(path))
    part["ids"] = json.loads(meta["ids"])
    part["factual_ids"] = json.loads(meta.get("factual_ids", meta["ids"]))
    part["names"] = {int(k): v for k, v in json.loads(meta["names"]).items()}
    part["interventions"] = json.loads(meta.get("interventions", "[]")) or [""] * len(part["ids"])
    return part


def load_pair_features(shards: list[Path], vlm: VLM, cache_dir: Path | None, batch_size: int = 256) -> PairFeatures:
    """Features of all pairs in `shards`; with a cache_dir, each shard is encoded only once."""
    parts, hits, misses, start = [], 0, 0, time.perf_counter()
    for shard in shards:
        path = cache_file(cache_dir, vlm.model_id, shard) if cache_dir is not None else None
        if path is not None and path.is_file():
            parts.append(_load(path))
            hits += 1
            continue
        part = _encode_shard(vlm, shard, batch_size)
        misses += 1
        if path is not None:
            _save(path, part)
        parts.append(part)
    names: dict[int, str] = {}
    for p in parts:
        for k, v in p["names"].items():
            names.setdefault(k, v)
    ids = [i for p in parts for i in p["ids"]]
    if len(set(ids)) != len(ids):
        raise InputError("the pair shards repeat sample ids; pass each shard once")
    return PairFeatures(ids=ids, factual_ids=[i for p in parts for i in p["factual_ids"]], feat=torch.cat([p["feat"] for p in parts]),
                        cf_feat=torch.cat([p["cf_feat"] for p in parts]),
                        label=torch.cat([p["label"] for p in parts]).long(),
                        cf_label=torch.cat([p["cf_label"] for p in parts]).long(), names=names,
                        interventions=[d for p in parts for d in p["interventions"]],
                        stats={"shards": len(shards), "cache_hits": hits, "cache_misses": misses,
                               "seconds": time.perf_counter() - start})


# --------------------------------------------------------------------------- named image sets


PIXEL_INDEPENDENT = ("limit", "repeat", "use_split", "only_classes", "class_limit", "shard_size")
"""data keys that choose which samples a stage processes, not what their pixels are."""


def refs_fingerprint(cfg, refs: Sequence, extra: object = None) -> str:
    """sha1 of what decides the pixels of `refs` (SampleRefs): the data config, the source's code,
    each sample's id, label, group, origin and stamp (a file's size and mtime)."""
    from cfgen.data.sources import SOURCES

    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in PIXEL_INDEPENDENT}
    h = hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode())
    source_cls = SOURCES.get(cfg.data.source)
    if source_cls is not None:
        try:
            h.update(Path(inspect.getfile(source_cls)).read_bytes())
        except (OSError, TypeError):
            pass
    for r in refs:
        # the stamp (a file's size and mtime) rather than a stat of the origin: origins are relative to data.root
        h.update(f"{r.id}|{r.label}|{r.group}|{r.origin}|{getattr(r, 'stamp', '')}".encode())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass
class ImageSet:
    """Frozen features of a named set of images (not from the pair shards)."""

    ids: list[str]
    """The ids whose image could be loaded, in the given order (the others are in `skipped`)."""
    feat: torch.Tensor  # (N, D)
    skipped: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def load_image_set(name: str, fingerprint: str, ids: list[str], loaders: list[Callable[[], np.ndarray]],
                   vlm: VLM, cache_dir: Path | None, batch_size: int = 256) -> ImageSet:
    """Features of the images `loaders[i]()` (uint8 H, W, C), cached as <name>-<fingerprint[:16]>.

    A loader raising ImageDecodeError or ValueError skips that image (its id goes to `skipped`).
    Older entries of the same name are removed when a new one is written.
    """
    start = time.perf_counter()
    path = cache_dir / vlm.model_id / "sets" / f"{name}-{fingerprint[:16]}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        feat = load_file(str(path))["feat"]
        return ImageSet(json.loads(meta["ids"]), feat, json.loads(meta["skipped"]),
                        {"cached": True, "images": feat.shape[0], "seconds": time.perf_counter() - start})
    kept, skipped, feats, batch, batch_ids = [], [], [], [], []

    def flush() -> None:
        if batch:
            feats.append(encode_images(vlm, np.stack(batch), batch_size))
            kept.extend(batch_ids)
            batch.clear()
            batch_ids.clear()

    for i, load in zip(ids, loaders):
        try:
            pixels = load()
        except (ImageDecodeError, ValueError):
            skipped.append(i)
            continue
        if batch and pixels.shape != batch[0].shape:
            raise InputError(f"tune: image {i} is {pixels.shape}, others of the set {name!r} {batch[0].shape}")
        batch.append(pixels)
        batch_ids.append(i)
        if len(batch) >= batch_size:
            flush()
    flush()
    feat = torch.cat(feats) if feats else torch.zeros(0, vlm.embed_dim)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{glob.escape(name)}-*.safetensors"):
            if stale.name.rsplit("-", 1)[0] == name:
                stale.unlink(missing_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"feat": feat.contiguous()}, str(tmp), metadata={"ids": json.dumps(kept), "skipped": json.dumps(skipped)})
        tmp.replace(path)
    return ImageSet(kept, feat, skipped, {"cached": False, "images": len(kept), "seconds": time.perf_counter() - start})
