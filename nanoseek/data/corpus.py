"""Prepare a data directory: documents -> tokenizer -> token shards.

Documents come from the embedded reasoning corpus (worked solutions of `reasoning-gym` families, generated locally:
no download) or from the user's files (plain text, JSONL with a text field, parquet). Splits:
  train    training documents
  val      held-out documents of the same families (different seed) or a seeded sample of the user's documents
  heldout  a family never used in training (evaluation only; embedded corpus only)
Each document is tokenized as [bos] + ids + [eos] and packed back to back into `{split}_{i:05d}.bin` (uint16 when the
vocabulary fits, else uint32). `meta.json` records the files, token counts and the unigram entropy of the training
tokens (the loss of the best model that ignores context: the baseline a trained model must beat).
"""

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np

from nanoseek.checkpoint import atomic_dir
from nanoseek.data.tasks import DEFAULT_HELDOUT, DEFAULT_TRAIN, drills as drill_docs, family_configs, generate, render
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import Tokenizer

SHARD_TOKENS = 50_000_000  # tokens per shard file


def reasoning_texts(n: int, seed: int = 0, families=None) -> list[str]:
    """n worked examples drawn evenly from the training families, rendered as text."""
    families = family_configs(families or DEFAULT_TRAIN)
    per = -(-n // len(families))
    docs = [render(ex) for i, (f, cfg) in enumerate(families.items()) for ex in generate(f, per, seed * 1000 + i, cfg)]
    random.Random(seed).shuffle(docs)
    return docs[:n]


def embedded_splits(docs: int, seed: int, families=None, heldout=None, drills: float = 0.0) -> dict[str, list[dict]]:
    """The embedded corpus: examples (question, answer, steps, family) per split, and `drills` × docs drill
    documents (the facts the steps are made of, data/tasks.drills) among the training documents ({'text': ...})."""
    families, heldout = family_configs(families or DEFAULT_TRAIN), family_configs(heldout or DEFAULT_HELDOUT)
    if set(families) & set(heldout):
        raise NanoseekError(f"families {sorted(set(families) & set(heldout))} cannot be both trained and held out")
    per = -(-docs // len(families))
    n_val = max(50, per // 20)
    splits = {"train": [], "val": [], "heldout": []}
    for i, (f, cfg) in enumerate(families.items()):  # different seeds per split: unseen problems for validation
        splits["train"] += generate(f, per, seed * 1000 + i, cfg)
        splits["val"] += generate(f, n_val, seed * 1000 + 500 + i, cfg)
    for i, (f, cfg) in enumerate(heldout.items()):
        splits["heldout"] += generate(f, n_val * 4, seed * 1000 + 900 + i, cfg)
    splits["train"] += [{"text": t} for t in drill_docs(families, round(docs * drills), seed * 1000 + 700)]
    random.Random(seed).shuffle(splits["train"])
    return splits


def read_user_documents(files, text_field: str = "text") -> list[str]:
    """Plain text (one document per file), JSONL (one per line, field `text_field`), parquet (column `text_field`)."""
    docs = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise NanoseekError(f"data file {p} does not exist")
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq  # heavy, and only for parquet input
            try:
                table = pq.read_table(p, columns=[text_field])
            except Exception as e:
                raise NanoseekError(f"{p}: cannot read column '{text_field}' ({str(e).splitlines()[0]})") from None
            new = [t for t in table.column(text_field).to_pylist() if isinstance(t, str) and t.strip()]
        else:
            try:
                raw = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise NanoseekError(f"{p} is not UTF-8 text") from None
            if p.suffix in (".jsonl", ".json"):
                new = []
                for i, line in enumerate(raw.splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise NanoseekError(f"{p}:{i} is not valid JSON") from None
                    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                        raise NanoseekError(f"{p}:{i} has no string field '{text_field}'")
                    if row[text_field].strip():
                        new.append(row[text_field])
            else:
                new = [raw] if raw.strip() else []
        if not new:
            raise NanoseekError(f"{p} holds no text")
        docs += new
    return docs


def unigram_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def write_shards(out: Path, split: str, docs: list[str], tok, dtype) -> tuple[list[str], np.ndarray]:
    """Tokenize and pack; returns the file names and the token counts per id."""
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    files, buf, n = [], [], 0

    def flush():
        nonlocal buf, n
        if buf:
            name = f"{split}_{len(files):05d}.bin"
            arr = np.concatenate(buf).astype(dtype)
            arr.tofile(out / name)
            files.append(name)
            buf, n = [], 0

    for i in range(0, len(docs), 1000):
        for enc in tok.tok.encode_batch(docs[i:i + 1000], add_special_tokens=False):
            ids = np.array([tok.bos_id, *enc.ids, tok.eos_id], dtype=np.int64)
            counts += np.bincount(ids, minlength=tok.vocab_size)
            buf.append(ids)
            n += len(ids)
            if n >= SHARD_TOKENS:
                flush()
    flush()
    return files, counts


def prepare(out, *, docs: int = 20000, seed: int = 0, files=(), text_field: str = "text", vocab_size: int = 4096,
            tokenizer=None, families=None, heldout=None, val_frac: float = 0.05, drills: float = 0.0) -> dict:
    """Write the data directory `out` (documents, tokenizer, shards, meta.json) and return its meta. It is written
    in a temporary directory beside `out` and renamed when complete: a process killed half-way leaves no `out`, so
    the same command simply prepares it again (a stale temporary is removed first)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise NanoseekError(f"data directory {out} is not empty")
    if out.exists():
        out.rmdir()
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    meta = {}
    if drills < 0:
        raise NanoseekError(f"--drills must be >= 0, got {drills}")
    atomic_dir(out, lambda tmp: meta.update(_write_data_dir(tmp, docs, seed, files, text_field, vocab_size, tokenizer,
                                                               families, heldout, val_frac, drills)), replace=False)
    return meta


def _write_data_dir(out: Path, docs, seed, files, text_field, vocab_size, tokenizer, families, heldout,
                    val_frac, drills) -> dict:
    if files:
        texts = read_user_documents(files, text_field)
        rng = random.Random(seed)
        rng.shuffle(texts)
        n_val = max(1, int(len(texts) * val_frac)) if len(texts) > 1 else 0
        split_docs = {"train": texts[n_val:], "val": texts[:n_val]}
        examples = {}
    else:
        examples = embedded_splits(docs, seed, families, heldout, drills)
        split_docs = {k: [ex["text"] if "text" in ex else render(ex) for ex in v] for k, v in examples.items()}
    if not split_docs["train"]:
        raise NanoseekError("no training documents")
    tok = tokenizer or Tokenizer.train(split_docs["train"], vocab_size=vocab_size)
    tok.save(out)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "seed": seed, "splits": {},
            "source": "files" if files else "reasoning-gym",
            "families": family_configs(families) if families else None,
            "heldout_families": family_configs(heldout) if heldout else None, "drills": drills or None}
    for split, d in split_docs.items():
        if not d:
            continue
        names, counts = write_shards(out, split, d, tok, dtype)
        meta["splits"][split] = {"files": names, "tokens": int(counts.sum()), "documents": len(d)}
        if split == "train":
            meta["unigram_entropy"] = unigram_entropy(counts)
    for split, exs in examples.items():  # the problems themselves, for evaluation and SFT
        with open(out / f"{split}_problems.jsonl", "w") as f:
            for ex in (e for e in exs if "question" in e):
                f.write(json.dumps({k: ex[k] for k in ("family", "question", "answer", "steps")}) + "\n")
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_meta(data_dir) -> dict:
    p = Path(data_dir) / "meta.json"
    if not p.is_file():
        raise NanoseekError(f"{data_dir} is not a nanoseek data directory (no meta.json; make one with nanoseek data)")
    meta = json.loads(p.read_text())
    for split in meta["splits"].values():
        for f in split["files"]:
            if not (Path(data_dir) / f).is_file():
                raise NanoseekError(f"{data_dir}: shard {f} is missing")
    return meta


def perplexity_note(meta: dict) -> str:
    h = meta.get("unigram_entropy")
    return f"unigram baseline {h:.3f} nats/token (ppl {math.exp(h):.1f})" if h else ""
