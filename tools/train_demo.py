#!/usr/bin/env python3
"""Build and train the embedded demo model (a tiny Llama) from offline text.

The corpus is text every Debian + CPython machine has: ``pydoc_data.topics``,
docstrings of the standard library, ``/usr/share/common-licenses`` and the
README/NEWS/FAQ/copyright files under ``/usr/share/doc``. It is split by
document (seeded hash) into train / calibration / held-out parts, a 2048-token
byte-level BPE tokenizer is trained on the train part, and a 4-layer Llama is
trained from scratch on CPU with early stopping on held-out loss.

Writes ``eora_export/demo_model/``: config, fp16 safetensors, tokenizer,
``calib.txt``, ``heldout.txt``, ``train_metrics.json`` and ``MODEL_CARD.md``
with held-out perplexity for FP16, INT4 RTN (group 128) and 2:4 pruning.

The LR schedule follows max(step / --steps, elapsed / --max-minutes), so a run
always ends within its wall-time budget; on a busy, shared CPU that means fewer
steps, and ``--init-from`` adds a further stage (new warmup + cosine cycle) on
top of a saved model. MODEL_CARD.md lists every stage's exact command.

Usage::

    python tools/train_demo.py --out eora_export/demo_model --steps 2400 --seed 0 --max-minutes 35
    python tools/train_demo.py --init-from eora_export/demo_model --out eora_export/demo_model --lr 2e-3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import pkgutil
import re
import shlex
import sys
import sysconfig
import time
import unicodedata
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "eora_export" / "demo_model"

VOCAB_SIZE = 2048
SEQ_LEN = 256
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
MAX_DOC_CHARS = 16_000  # long documents are cut into pieces of about this size
MAX_DOC_FILE_CHARS = 400_000  # at most this much kept text from one /usr/share/doc file
SPLIT_CALIB = 0.03
SPLIT_HELDOUT = 0.03
TEXT_CAP_BYTES = 400_000  # cap on calib.txt and heldout.txt

# Standard-library top-level packages whose docstrings are not useful prose
# (tests, GUI demos, codec tables) or whose import has side effects.
STDLIB_SKIP = {
    "__main__",
    "__phello__",
    "_pydev_bundle",
    "antigravity",
    "ctypes.test",
    "distutils.tests",
    "encodings",
    "ensurepip",
    "idlelib",
    "lib2to3",
    "pydoc_data",
    "test",
    "this",
    "tkinter",
    "turtle",
    "turtledemo",
    "unittest.test",
    "xxlimited",
    "xxlimited_35",
    "xxsubtype",
}


# --------------------------------------------------------------------------- corpus


@dataclass
class Document:
    """One unit of the document-level split."""

    source: str  # pydoc | stdlib | licenses | doc
    name: str
    text: str


@dataclass
class Corpus:
    """The three splits, as lists of documents."""

    train: list[Document] = field(default_factory=list)
    calib: list[Document] = field(default_factory=list)
    heldout: list[Document] = field(default_factory=list)


def normalise(text: str) -> str:
    """NFC, tabs to spaces, no control characters, no trailing blanks, <= 1 blank line."""
    text = unicodedata.normalize("NFC", text).expandtabs(4)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch)[0] != "C")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def is_prose(paragraph: str) -> bool:
    """Heuristic filter for English prose paragraphs (drops tables, code, file lists)."""
    if len(paragraph) < 60:
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in paragraph) / len(paragraph)
    ascii_share = sum(ch.isascii() for ch in paragraph) / len(paragraph)
    return letters >= 0.8 and ascii_share >= 0.98


def split_long(doc: Document) -> list[Document]:
    """Cut a document into pieces of at most ~MAX_DOC_CHARS at paragraph boundaries."""
    if len(doc.text) <= MAX_DOC_CHARS:
        return [doc]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for para in doc.text.split("\n\n"):
        if current and size + len(para) > MAX_DOC_CHARS:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        pieces.append("\n\n".join(current))
    return [Document(doc.source, f"{doc.name}#{i}", p) for i, p in enumerate(pieces)]


def pydoc_documents() -> list[Document]:
    """One document per ``pydoc_data.topics`` entry."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        text = normalise(topics[key])
        if len(text) >= 100:
            docs.append(Document("pydoc", key, text))
    return docs


def _stdlib_module_names() -> list[str]:
    """Sorted names of importable-looking standard-library modules, skip list applied."""
    stdlib = sysconfig.get_paths()["stdlib"]
    roots = [stdlib, os.path.join(stdlib, "lib-dynload")]
    names = set(sys.builtin_module_names)
    names.update(m.name for m in pkgutil.iter_modules(roots))

    def skipped(name: str) -> bool:
        parts = name.split(".")
        return (
            any(".".join(parts[: i + 1]) in STDLIB_SKIP for i in range(len(parts)))
            or any(p in ("test", "tests", "__main__") or p.startswith("_test") for p in parts)
            or name.startswith(("site", "_pyrepl"))
        )

    out: list[str] = []
    pending = sorted(n for n in names if not skipped(n))
    while pending:
        name = pending.pop(0)
        out.append(name)
        spec_path = None
        with contextlib.suppress(Exception):
            spec = importlib.util.find_spec(name)
            spec_path = spec.submodule_search_locations if spec else None
        if spec_path:
            subs = [m.name for m in pkgutil.iter_modules(list(spec_path), prefix=name + ".")]
            pending = sorted(pending + [s for s in subs if not skipped(s)])
    return out


def _member_docs(obj: object) -> Iterator[object]:
    """Yield the members of a class whose docstrings belong to it."""
    for _, value in sorted(vars(obj).items()):
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            value = value.fget
        yield value


def stdlib_documents() -> list[Document]:
    """One document per stdlib module: its docstring, then those of what it defines."""
    with warnings.catch_warnings():  # reading e.g. typing.io's attributes warns
        warnings.simplefilter("ignore")
        return _collect_stdlib_documents()


def _collect_stdlib_documents() -> list[Document]:
    seen: set[str] = set()
    docs = []
    for name in _stdlib_module_names():
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
        except BaseException:  # any failure, even SystemExit, means "skip it"
            continue
        parts: list[str] = []

        def add(obj: object, parts: list[str] = parts) -> None:
            raw = getattr(obj, "__doc__", None)
            if not isinstance(raw, str):
                return
            text = normalise(inspect.cleandoc(raw))
            key = hashlib.sha1(text.encode()).hexdigest()
            if len(text) >= 40 and key not in seen:
                seen.add(key)
                parts.append(text)

        add(module)
        for attr, value in sorted(vars(module).items(), key=lambda kv: kv[0]):
            if getattr(value, "__module__", None) != name or inspect.ismodule(value):
                continue
            if attr.startswith("__") and attr.endswith("__"):
                continue
            add(value)
            if inspect.isclass(value):
                for member in _member_docs(value):
                    add(member)
        text = "\n\n".join(parts)
        if len(text) >= 100:
            docs.append(Document("stdlib", name, text))
    return docs


def _read_text(path: Path) -> str | None:
    """Read a (possibly gzipped) UTF-8 text file; None when it is not one."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def _prose_document(source: str, name: str, text: str, seen: set[str], cap: int) -> Document | None:
    """Unwrap paragraphs, keep prose not seen before (global dedup), up to ``cap`` chars."""
    kept: list[str] = []
    size = 0
    for para in re.split(r"\n[ \t]*\n", normalise(text)):
        flat = " ".join(para.split())
        if not is_prose(flat):
            continue
        key = hashlib.sha1(flat.lower().encode()).hexdigest()
        if key in seen:
            continue
        seen.add(key)
        kept.append(flat)
        size += len(flat) + 2
        if size >= cap:
            break
    if size < 200:
        return None
    return Document(source, name, "\n\n".join(kept))


def license_documents(seen: set[str]) -> list[Document]:
    """The licence texts in /usr/share/common-licenses, paragraphs deduplicated."""
    root = Path("/usr/share/common-licenses")
    docs = []
    if root.is_dir():
        for path in sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink()):
            text = _read_text(path)
            doc = text and _prose_document("licenses", path.name, text, seen, MAX_DOC_FILE_CHARS)
            if doc:
                docs.append(doc)
    return docs


def _wanted_doc_file(name: str) -> bool:
    low = name.lower().removesuffix(".gz")
    if low.startswith("changelog") or low.endswith((".html", ".css", ".png", ".js", ".svg")):
        return False
    return low == "copyright" or low.startswith(("readme", "news", "faq", "todo"))


def doc_documents(seen: set[str]) -> list[Document]:
    """README / NEWS / FAQ / TODO / copyright files under /usr/share/doc (prose only)."""
    root = Path("/usr/share/doc")
    docs = []
    if not root.is_dir():
        return docs
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            if path.is_symlink() or not _wanted_doc_file(fname):
                continue
            text = _read_text(path)
            name = str(path.relative_to(root))
            doc = text and _prose_document("doc", name, text, seen, MAX_DOC_FILE_CHARS)
            if doc:
                docs.append(doc)
    return docs


def split_of(doc: Document, seed: int) -> str:
    """Seeded, order-independent assignment of a document to a split."""
    digest = hashlib.sha256(f"{seed}:{doc.source}:{doc.name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < SPLIT_CALIB:
        return "calib"
    if u < SPLIT_CALIB + SPLIT_HELDOUT:
        return "heldout"
    return "train"


def build_corpus(seed: int) -> tuple[Corpus, dict[str, int]]:
    """Collect every source, cut long documents and split by document."""
    seen: set[str] = set()
    sources = {
        "pydoc": pydoc_documents(),
        "stdlib": stdlib_documents(),
        "licenses": license_documents(seen),
        "doc": doc_documents(seen),
    }
    chars = {k: sum(len(d.text) for d in v) for k, v in sources.items()}
    corpus = Corpus()
    for docs in sources.values():
        for doc in docs:
            for piece in split_long(doc):
                getattr(corpus, split_of(piece, seed)).append(piece)
    return corpus, chars


def capped_text(docs: list[Document], cap: int) -> tuple[str, list[Document]]:
    """Join whole documents with blank lines until ``cap`` UTF-8 bytes."""
    kept: list[Document] = []
    size = 0
    for doc in docs:
        n = len(doc.text.encode()) + 2
        if kept and size + n > cap:
            continue
        kept.append(doc)
        size += n
    return "\n\n".join(d.text for d in kept) + "\n", kept


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[Document]) -> PreTrainedTokenizerFast:
    """Byte-level BPE, vocab 2048, BOS prepended by the post-processor (Llama style)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=1024,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """save_pretrained, plus files that keep the folder loadable by transformers 4.x as well."""
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # v5 writes "TokenizersBackend", unknown to v4
    for key in ("is_local", "local_files_only", "name_or_path"):  # loader state, not configuration
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def encode_stream(tokenizer: PreTrainedTokenizerFast, docs: list[Document]) -> torch.Tensor:
    """Token stream ``<s> doc </s> <s> doc </s> ...`` for training."""
    enc = tokenizer.backend_tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    ids: list[int] = []
    for seq in enc:
        ids.append(tokenizer.bos_token_id)
        ids.extend(seq.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, length: int = SEQ_LEN) -> torch.Tensor:
    """Non-overlapping windows [n, length]; the tail shorter than ``length`` is dropped."""
    n = ids.numel() // length
    return ids[: n * length].view(n, length)


def text_windows(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """The evaluation protocol: tokenise the whole text (no BOS), 256-token windows."""
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return windows(torch.tensor(ids, dtype=torch.long))


# --------------------------------------------------------------------------- model


def make_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The demo architecture: 4 x (256 wide, 4 heads of 64, MLP 768)."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def mean_nll(model: LlamaForCausalLM, wins: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token NLL over all windows (each window predicts its last 255 tokens)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, wins.shape[0], batch):
        x = wins[i : i + batch]
        logits = model(input_ids=x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def lr_at(progress: float, peak: float, warmup: float, floor: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``floor * peak``; ``progress`` in [0, 1]."""
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))


class ThreadTuner:
    """Pick the faster torch thread count in chunks of steps (a shared CPU can make 1 beat 2)."""

    def __init__(self, choices: list[int], chunk: int = 20, explore_every: int = 6) -> None:
        self.choices, self.chunk, self.explore_every = choices, chunk, explore_every
        self.speed: dict[int, float] = {}  # seconds per step, latest chunk
        self.current = choices[0]
        self.chunks = 0
        self.chunk_start = time.time()
        self.chunk_steps = 0
        torch.set_num_threads(self.current)

    def pause(self) -> None:
        """Exclude what follows (evaluation) from the timing."""
        self.chunk_start, self.chunk_steps = time.time(), 0

    def stepped(self) -> None:
        """Call after every optimizer step."""
        self.chunk_steps += 1
        if len(self.choices) == 1 or self.chunk_steps < self.chunk:
            return
        self.speed[self.current] = (time.time() - self.chunk_start) / self.chunk_steps
        self.chunks += 1
        untried = [c for c in self.choices if c not in self.speed]
        if untried:
            self.current = untried[0]
        elif self.chunks % self.explore_every == 0:  # re-measure the other choice now and then
            self.current = min((c for c in self.choices if c != self.current), key=lambda c: self.speed[c])
        else:
            self.current = min(self.choices, key=lambda c: self.speed[c])
        torch.set_num_threads(self.current)
        self.pause()


@dataclass
class TrainResult:
    """What the training loop reports."""

    best_state: dict[str, torch.Tensor]
    best_step: int
    best_heldout_nll: float
    steps_run: int
    wall_s: float
    stop_reason: str
    train_loss_at_best: float
    history: list[dict[str, float]]
    thread_steps: dict[int, int]


def train(
    model: LlamaForCausalLM,
    train_ids: torch.Tensor,
    eval_wins: torch.Tensor,
    args: argparse.Namespace,
) -> TrainResult:
    """AdamW + warmup/cosine; progress = max(step/steps, elapsed/budget); early stopping."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    budget_s = args.max_minutes * 60.0
    warmup = args.warmup / args.steps

    def batches() -> Iterator[torch.Tensor]:
        while True:
            offset = int(torch.randint(0, SEQ_LEN, (1,), generator=gen))
            wins = windows(train_ids[offset:])
            perm = torch.randperm(wins.shape[0], generator=gen)
            for i in range(0, len(perm) - args.batch + 1, args.batch):
                yield wins[perm[i : i + args.batch]]

    best_state = copy.deepcopy(model.state_dict())
    best_nll, best_step, bad_evals = float("inf"), 0, 0
    if args.init_from is not None:  # a continued model must beat where it started
        best_nll = mean_nll(model, eval_wins)
        tqdm.write(f"start: heldout nll {best_nll:.4f} (ppl {math.exp(best_nll):.2f})")
    recent: list[float] = []
    train_loss_at_best = float("nan")
    history: list[dict[str, float]] = []
    stop_reason = "steps"
    start = time.time()
    step = 0
    tuner = ThreadTuner([args.threads] if args.threads > 0 else [2, 1])
    thread_steps: dict[int, int] = {}
    model.train()
    bar = tqdm(total=args.steps, desc="train", mininterval=5.0, dynamic_ncols=True)
    for x in batches():
        elapsed = time.time() - start
        progress = max(step / args.steps, elapsed / budget_s)
        if progress >= 1.0:
            stop_reason = "steps" if step >= args.steps else "time budget"
            break
        lr = lr_at(progress, args.lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        thread_steps[tuner.current] = thread_steps.get(tuner.current, 0) + 1
        tuner.stepped()
        recent = [*recent, loss.item()][-args.eval_every :]
        bar.update(1)
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{lr:.2e}", refresh=False)
        if step % args.eval_every == 0:
            nll = mean_nll(model, eval_wins)
            tuner.pause()
            train_avg = sum(recent) / len(recent)
            history.append({"step": step, "train_loss": train_avg, "heldout_nll": nll, "lr": lr, "elapsed_s": time.time() - start})
            speeds = " ".join(f"{k}t:{v:.2f}s/step" for k, v in sorted(tuner.speed.items()))
            tqdm.write(
                f"step {step:5d}  train {train_avg:.4f}  heldout nll {nll:.4f} "
                f"(ppl {math.exp(nll):.2f})  lr {lr:.2e}  {time.time() - start:.0f}s  [{speeds}]"
            )
            if nll < best_nll - 1e-3:
                best_nll, best_step, bad_evals = nll, step, 0
                best_state = copy.deepcopy(model.state_dict())
                train_loss_at_best = train_avg
            else:
                bad_evals += 1
                if bad_evals >= args.patience:
                    stop_reason = f"early stop (no held-out gain in {args.patience} evals)"
                    break
    bar.close()
    if step % args.eval_every != 0:  # final partial interval
        nll = mean_nll(model, eval_wins)
        train_avg = sum(recent) / max(1, len(recent))
        history.append({"step": step, "train_loss": train_avg, "heldout_nll": nll, "lr": 0.0, "elapsed_s": time.time() - start})
        tqdm.write(f"final step {step}: train {train_avg:.4f}  heldout nll {nll:.4f}")
        if nll < best_nll - 1e-3:
            best_nll, best_step = nll, step
            best_state = copy.deepcopy(model.state_dict())
            train_loss_at_best = train_avg
    return TrainResult(
        best_state,
        best_step,
        best_nll,
        step,
        time.time() - start,
        stop_reason,
        train_loss_at_best,
        history,
        thread_steps,
    )


# --------------------------------------------------------------------------- compression checks


def decoder_linears(model: LlamaForCausalLM) -> Iterator[torch.nn.Linear]:
    """Every Linear inside the decoder layers (not lm_head, not embeddings)."""
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            yield module


@torch.no_grad()
def int4_rtn_(model: LlamaForCausalLM, group: int = 128) -> None:
    """Symmetric RTN INT4 fake-quantisation, groups along the input dimension, in place."""
    for lin in decoder_linears(model):
        w = lin.weight.float()
        out_f, in_f = w.shape
        g = w.view(out_f, in_f // group, group)
        scale = (g.abs().amax(dim=-1, keepdim=True) / 7.0).clamp_min(1e-12)
        q = torch.clamp(torch.round(g / scale), -8, 7)
        lin.weight.copy_((q * scale).view(out_f, in_f).to(lin.weight.dtype))


@torch.no_grad()
def prune_24_(model: LlamaForCausalLM) -> None:
    """2:4 magnitude pruning: keep the 2 largest |w| of every 4 consecutive inputs, in place."""
    for lin in decoder_linears(model):
        w = lin.weight
        g = w.view(w.shape[0], -1, 4)
        idx = g.abs().topk(2, dim=-1).indices
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
        lin.weight.copy_((g * mask).view_as(w))


def load_fp32(out: Path) -> LlamaForCausalLM:
    """Load the saved fp16 weights and compute in fp32."""
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float16)
    return model.float().eval()


# --------------------------------------------------------------------------- main


def stage_summary(facts: dict) -> dict:
    """The per-stage part of a run's facts (one call of this script)."""
    keys = (
        "command",
        "lr",
        "warmup",
        "steps_planned",
        "max_minutes",
        "steps_run",
        "stop_reason",
        "best_step",
        "tokens_seen",
        "wall_min",
        "thread_steps",
        "train_loss_at_best",
        "heldout_nll_best_fp32",
    )
    return {k: facts.get(k) for k in keys}


def write_model_card(out: Path, facts: dict) -> None:
    """MODEL_CARD.md from the collected facts."""
    f = facts
    src_rows = "\n".join(
        f"| {name} | {f['source_chars'][name]:,} | {f['source_docs'][name]:,} | {desc} |"
        for name, desc in [
            ("pydoc", "`pydoc_data.topics` (the Python language/library help topics)"),
            ("stdlib", "docstrings of the importable CPython standard-library modules"),
            ("licenses", "licence texts in `/usr/share/common-licenses`"),
            ("doc", "README / NEWS / FAQ / TODO / copyright prose under `/usr/share/doc`"),
        ]
    )
    split_rows = "\n".join(
        f"| {s} | {f['split_docs'][s]:,} | {f['split_chars'][s]:,} | {f['split_tokens'][s]:,} |" for s in ("train", "calib", "heldout")
    )
    ppl = f["ppl"]
    stages = f.get("stages") or [stage_summary(f)]
    commands = "\n".join(st["command"] for st in stages)
    stage_rows = "\n".join(
        f"| {i + 1} | {st['lr']} | {st['warmup']} | {st['steps_planned']:,} / {st['steps_run']:,} "
        f"| {st['max_minutes']:g} min | {st['stop_reason']} | {st['best_step']:,} | {st['wall_min']:.1f} min "
        f"| {st['heldout_nll_best_fp32']:.4f} | {st['thread_steps']} |"
        for i, st in enumerate(stages)
    )
    tok_files = "`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`"
    d_int4 = 100 * (ppl["int4_rtn_g128"] / ppl["fp16"] - 1)
    d_24 = 100 * (ppl["sparse24_magnitude"] / ppl["fp16"] - 1)
    text = f"""# eora-export demo model

A tiny Llama (`LlamaForCausalLM`, {f["params"]:,} parameters) trained from scratch on CPU,
shipped inside the package so that the whole pipeline (calibrate, compress, compensate,
export, verify) can run offline in tests and demos. It is a toy: it writes English-looking
Python-documentation text and nothing more. Do not use it for anything but testing.

Produced by `tools/train_demo.py`. Reproduce with (one line per training stage):

```
{commands}
```

(Training on CPU is not bit-reproducible across machines: thread scheduling, and the
contents of `/usr/share/doc` depend on the installed packages. Corpus SHA-256 of this
run: `{f["corpus_sha256"]}`.)

## Files

| file | what |
|---|---|
| `config.json`, `generation_config.json` | the Llama configuration |
| `model.safetensors` | weights, **float16** |
| {tok_files} | byte-level BPE, vocab {VOCAB_SIZE}; `<s>` prepended by default |
| `calib.txt` | the calibration split (documents separated by blank lines), {f["calib_bytes"]:,} bytes |
| `heldout.txt` | the held-out split, same format, {f["heldout_bytes"]:,} bytes |
| `train_metrics.json` | the figures below, machine-readable, plus the eval history |

Load it with `LlamaForCausalLM.from_pretrained(path, dtype=torch.float16)` and
`AutoTokenizer.from_pretrained(path)`.

## Corpus

All text exists offline on a Debian machine with CPython {f["python"]}. Whitespace is
normalised (NFC, tabs expanded, trailing blanks and extra blank lines removed); prose
files are unwrapped to one line per paragraph, filtered to English-looking prose and
deduplicated by paragraph across files.

| source | chars | documents | contents |
|---|---:|---:|---|
{src_rows}

Documents longer than {MAX_DOC_CHARS:,} characters are cut at paragraph boundaries. Each
piece goes to a split by a seeded hash of its name (seed {f["seed"]}): about
{100 - 100 * (SPLIT_CALIB + SPLIT_HELDOUT):.0f}% train, {100 * SPLIT_CALIB:.0f}% calibration,
{100 * SPLIT_HELDOUT:.0f}% held-out, so no held-out or calibration document is trained on.
`calib.txt` and `heldout.txt` are capped at {TEXT_CAP_BYTES:,} bytes (whole documents).

| split | documents | chars | tokens |
|---|---:|---:|---:|
{split_rows}

(Token counts: the tokenizer on each document, no special tokens; for calib/held-out,
on the text files as written.)

## Architecture

| | |
|---|---|
| layers | 4 |
| hidden size | 256 |
| attention heads / KV heads | 4 / 4 (head dim 64) |
| MLP (SwiGLU) intermediate size | 768 |
| vocabulary | {VOCAB_SIZE} |
| max positions | 1024 (RoPE, theta {f["rope_theta"]}) |
| RMSNorm eps | 1e-5 |
| tied embeddings | no |
| parameters | {f["params"]:,} ({f["params_decoder_linear"]:,} in decoder Linears) |

## Training

AdamW (betas 0.9/0.95, weight decay {f["weight_decay"]} on matrices), linear warmup then cosine
decay to 10% of the peak LR, gradient clipping 1.0, {f["batch"]} sequences x {SEQ_LEN} tokens per
step, fp32 on CPU (bf16 autocast was ~30x slower on this AVX2 CPU). The schedule's progress is
max(step / planned steps, elapsed / time budget), so each stage finishes its decay within its
budget. Held-out loss (first {f["eval_windows"]} held-out windows) every {f["eval_every"]} steps;
the best checkpoint is kept, with early stopping after {f["patience"]} evaluations without
improvement. A later stage (`--init-from`) starts from the previous stage's saved weights with a
fresh optimizer and a new warmup + cosine cycle, and keeps them unless it beats them.

| stage | peak LR | warmup | steps planned / run | budget | stop | best step | wall | best held-out nll | threads: steps |
|---:|---:|---:|---:|---:|---|---:|---:|---:|---|
{stage_rows}

| | |
|---|---:|
| optimizer steps, all stages | {f["steps_total"]:,} |
| training tokens seen | {f["tokens_total"]:,} ({f["tokens_total"] / f["split_tokens"]["train"]:.2f} epochs of train) |
| wall time, training loops | {f["wall_min_total"]:.1f} min |
| wall time, last run of the script | {f["total_min"]:.1f} min |
| train loss (mean of the {f["eval_every"]} steps before the kept checkpoint) | {f["train_loss_at_best"]:.4f} |
| train-split loss of the saved model (eval protocol, {f["train_eval_windows"]} windows) | {f["train_eval_nll"]:.4f} |

## Held-out perplexity

exp(mean token NLL) over `heldout.txt`, tokenised as one text without special tokens and
cut into {f["heldout_windows"]} non-overlapping {SEQ_LEN}-token windows (each window predicts its
last {SEQ_LEN - 1} tokens); weights as saved (fp16), compute in fp32.

| model | held-out ppl | vs FP16 |
|---|---:|---:|
| FP16 (as saved) | {ppl["fp16"]:.3f} | |
| INT4 RTN, symmetric, group 128 (decoder Linears) | {ppl["int4_rtn_g128"]:.3f} | {d_int4:+.1f}% |
| 2:4 magnitude pruning (decoder Linears) | {ppl["sparse24_magnitude"]:.3f} | {d_24:+.1f}% |

INT4 RTN: scale = absmax/7 per group of 128 inputs, q = clamp(round(w/scale), -8, 7).
2:4: keep the two largest |w| of every four consecutive input weights. lm_head and the
embeddings are left untouched in both.
"""
    (out / "MODEL_CARD.md").write_text(text)


def main() -> None:
    """Parse flags, build corpus, train tokenizer and model, save, evaluate."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--steps", type=int, default=2400, help="planned optimizer steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=35.0, help="training wall-time budget")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = pick 1 or 2 by measured speed")
    ap.add_argument("--eval-windows", type=int, default=128, help="held-out windows used for early stopping")
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue from a model folder this script wrote (same seed): reuse its tokenizer and weights, "
        "start a new warmup + cosine cycle, record it as a further training stage",
    )
    ap.add_argument("--final-windows", type=int, default=0, help="cap on held-out windows in the final figures (0 = all)")
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads if args.threads > 0 else 2)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    print("building corpus ...", flush=True)
    corpus, source_chars = build_corpus(args.seed)
    source_docs: dict[str, int] = {}
    for split in (corpus.train, corpus.calib, corpus.heldout):
        for d in split:
            source_docs[d.source] = source_docs.get(d.source, 0) + 1
    calib_text, calib_docs = capped_text(corpus.calib, TEXT_CAP_BYTES)
    heldout_text, heldout_docs = capped_text(corpus.heldout, TEXT_CAP_BYTES)
    corpus_sha = hashlib.sha256()
    for split in (corpus.train, corpus.calib, corpus.heldout):
        for d in split:
            corpus_sha.update(d.text.encode())
    print(f"  sources (chars): {source_chars}  ({time.time() - t0:.0f}s)", flush=True)

    previous_stages: list[dict] = []
    if args.init_from is not None:
        prev = json.loads((args.init_from / "train_metrics.json").read_text())
        if prev["corpus_sha256"] != corpus_sha.hexdigest():
            raise SystemExit(f"--init-from {args.init_from}: it was trained on another corpus or split")
        previous_stages = prev.get("stages") or [stage_summary(prev)]
        print(f"loading tokenizer and weights from {args.init_from} ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
    else:
        print("training tokenizer ...", flush=True)
        tokenizer = train_tokenizer(corpus.train)
    train_ids = encode_stream(tokenizer, corpus.train)
    calib_wins = text_windows(tokenizer, calib_text)
    heldout_wins = text_windows(tokenizer, heldout_text)
    if args.final_windows > 0:  # quick smoke runs only
        heldout_wins = heldout_wins[: args.final_windows]
    split_tokens = {
        "train": int(train_ids.numel() - 2 * len(corpus.train)),
        "calib": len(tokenizer.backend_tokenizer.encode(calib_text, add_special_tokens=False).ids),
        "heldout": len(tokenizer.backend_tokenizer.encode(heldout_text, add_special_tokens=False).ids),
    }
    split_docs = {"train": len(corpus.train), "calib": len(calib_docs), "heldout": len(heldout_docs)}
    split_chars = {
        "train": sum(len(d.text) for d in corpus.train),
        "calib": len(calib_text),
        "heldout": len(heldout_text),
    }
    print(f"  docs {split_docs}  tokens {split_tokens}  held-out windows {len(heldout_wins)}", flush=True)

    config = make_config(tokenizer)
    model = LlamaForCausalLM(config)
    if args.init_from is not None:
        model = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        config = model.config
    params = sum(p.numel() for p in model.parameters())
    params_lin = sum(m.weight.numel() for m in decoder_linears(model))
    print(f"model: {params:,} parameters", flush=True)

    result = train(model, train_ids, heldout_wins[: args.eval_windows], args)
    model.load_state_dict(result.best_state)
    print(
        f"training done: {result.steps_run} steps in {result.wall_s / 60:.1f} min ({result.stop_reason}); "
        f"best step {result.best_step}, held-out nll {result.best_heldout_nll:.4f}",
        flush=True,
    )

    # Save (fp16) and the text splits.
    for stale in ("model.safetensors", "pytorch_model.bin"):
        (out / stale).unlink(missing_ok=True)
    model.half().save_pretrained(out)
    save_tokenizer(tokenizer, out)
    (out / "calib.txt").write_text(calib_text)
    (out / "heldout.txt").write_text(heldout_text)

    # Evaluate exactly what was saved.
    fp = load_fp32(out)
    n_small = min(args.eval_windows, len(heldout_wins))
    train_all = windows(train_ids)
    train_eval = train_all[:: max(1, len(train_all) // n_small)][:n_small]
    nll_train = mean_nll(fp, train_eval)
    ppl = {"fp16": math.exp(mean_nll(fp, heldout_wins))}
    q = load_fp32(out)
    int4_rtn_(q)
    ppl["int4_rtn_g128"] = math.exp(mean_nll(q, heldout_wins))
    s = load_fp32(out)
    prune_24_(s)
    ppl["sparse24_magnitude"] = math.exp(mean_nll(s, heldout_wins))
    ppl_calib = math.exp(mean_nll(fp, calib_wins[:n_small]))

    print(f"held-out perplexity  FP16 (fp32 compute): {ppl['fp16']:.3f}")
    print(f"held-out perplexity  INT4 RTN g128:       {ppl['int4_rtn_g128']:.3f} ({100 * (ppl['int4_rtn_g128'] / ppl['fp16'] - 1):+.1f}%)")
    print(f"held-out perplexity  2:4 magnitude:       {ppl['sparse24_magnitude']:.3f} ({100 * (ppl['sparse24_magnitude'] / ppl['fp16'] - 1):+.1f}%)")
    print(f"calibration perplexity FP16 ({n_small} windows): {ppl_calib:.3f};  train-split loss {nll_train:.4f}")

    command = "python tools/train_demo.py " + shlex.join(sys.argv[1:])
    facts = {
        "command": command.strip(),
        "python": ".".join(map(str, sys.version_info[:3])),
        "torch": torch.__version__,
        "seed": args.seed,
        "corpus_sha256": corpus_sha.hexdigest(),
        "source_chars": source_chars,
        "source_docs": source_docs,
        "split_docs": split_docs,
        "split_chars": split_chars,
        "split_tokens": split_tokens,
        "calib_bytes": len(calib_text.encode()),
        "heldout_bytes": len(heldout_text.encode()),
        "heldout_windows": len(heldout_wins),
        "train_eval_windows": len(train_eval),
        "params": params,
        "params_decoder_linear": params_lin,
        "rope_theta": getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta"),
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "batch": args.batch,
        "threads": args.threads,
        "thread_steps": {str(k): v for k, v in sorted(result.thread_steps.items())},
        "steps_planned": args.steps,
        "max_minutes": args.max_minutes,
        "eval_every": args.eval_every,
        "eval_windows": min(args.eval_windows, len(heldout_wins)),
        "patience": args.patience,
        "steps_run": result.steps_run,
        "stop_reason": result.stop_reason,
        "best_step": result.best_step,
        "tokens_seen": result.steps_run * args.batch * SEQ_LEN,
        "epochs": result.steps_run * args.batch * SEQ_LEN / max(1, train_ids.numel()),
        "wall_min": result.wall_s / 60,
        "total_min": (time.time() - t0) / 60,
        "train_loss_at_best": result.train_loss_at_best,
        "train_eval_nll": nll_train,
        "heldout_nll_best_fp32": result.best_heldout_nll,
        "calib_ppl_fp16": ppl_calib,
        "ppl": ppl,
        "history": result.history,
    }
    facts["stages"] = [*previous_stages, stage_summary(facts)]
    facts["steps_total"] = sum(st["steps_run"] for st in facts["stages"])
    facts["tokens_total"] = sum(st["tokens_seen"] for st in facts["stages"])
    facts["wall_min_total"] = sum(st["wall_min"] for st in facts["stages"])
    (out / "train_metrics.json").write_text(json.dumps(facts, indent=1) + "\n")
    write_model_card(out, facts)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
